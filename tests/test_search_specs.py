"""Every shipped spec validates; every sampler builds and drives a real OptunaSearch."""

from pathlib import Path

import pytest

from coun_tune.config.search_spec import SAMPLERS, load_search_spec, validate_search_spec

SPECS = sorted((Path(__file__).parent.parent / "search_spaces").rglob("*.yaml"))


def test_required_specs_ship():
    names = {p.name for p in SPECS}
    assert {
        "digits_quick.yaml",
        "fashion_mnist_coun.yaml",
        "cifar10_resnet18_coun.yaml",
        "cifar100_resnet18_coun.yaml",
    } <= names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_shipped_spec_validates(path, monkeypatch, tmp_path):
    doc = __import__("yaml").safe_load(path.read_text())
    doc["scenario"].pop("data_root", None)  # the CIFAR specs point at a data dir this machine lacks
    spec = validate_search_spec(doc)
    assert spec.space and 2 <= len(spec.objectives) <= 3


def test_paper_ranges_in_cifar_specs():
    for name in ("cifar10_resnet18_coun.yaml", "cifar100_resnet18_coun.yaml"):
        doc = __import__("yaml").safe_load((Path(__file__).parent.parent / "search_spaces" / name).read_text())
        spec = validate_search_spec({**doc, "scenario": {k: v for k, v in doc["scenario"].items() if k != "data_root"}})
        t, lam, lr, ep = (spec.space[k] for k in ("temperature", "cl_weight", "lr", "epochs"))
        assert 0 < t.low and t.high <= 0.3
        assert (lam.low, lam.high) == (0.1, 6.0)
        assert (lr.low, lr.high) == (0.01, 0.1)
        assert ep.high <= 50 and spec.batch_size == 256


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_suggests_inside_the_space(sampler):
    from ray.tune.search.optuna import OptunaSearch

    from coun_tune.search.runner import make_sampler, optuna_space

    spec = load_search_spec(Path(__file__).parent.parent / "search_spaces" / "digits_quick.yaml")
    spec.sampler = sampler
    searcher = OptunaSearch(
        space=optuna_space(spec.space),
        metric=list(spec.objectives),
        mode=list(spec.objectives.values()),
        sampler=make_sampler(spec),
        seed=0,
    )
    for i in range(3):
        cfg = searcher.suggest(f"t{i}")
        assert set(cfg) == set(spec.space)
        for k, d in spec.space.items():
            assert d.low <= cfg[k] <= d.high, (k, cfg[k])
        assert isinstance(cfg["epochs"], int)
        searcher.on_trial_complete(f"t{i}", {"forget_gap": float(i), "retain_acc": 90.0 + i})
    import pickle

    pickle.loads(pickle.dumps(searcher))  # Tune pickles the searcher with the experiment state


def test_method_spaces_are_generated_from_declared_ranges():
    import yaml as _yaml

    from coun_tune.config.method_spaces import HEADER, all_specs
    from coun_tune.core.methods import METHODS

    folder = Path(__file__).parent.parent / "search_spaces" / "fashion_mnist"
    expected = all_specs("fashion_mnist")
    assert {p.name for p in folder.glob("*.yaml")} == set(expected)
    for fname, spec in expected.items():
        text = (folder / fname).read_text()
        assert text.startswith(HEADER) and _yaml.safe_load(text) == spec, fname
    # every method appears with the plug-in off and (except ft, whose plug-in form is coun) on
    for m in METHODS:
        assert f"{m}.yaml" in expected
        if m not in ("ft", "coun"):
            assert _yaml.safe_load((folder / f"{m}_cl.yaml").read_text())["space"]["cl_weight"] != 0.0


def test_nsga2_never_repeats_a_config():
    """Plain NSGA-II repeated a config 8 times in these 20 seeded 8-trial searches."""
    import math

    import optuna

    from coun_tune.search.runner import make_sampler, optuna_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_search_spec(Path(__file__).parent.parent / "search_spaces" / "digits_quick.yaml")
    repeats = 0
    for seed in range(20):
        spec.seed = seed
        study = optuna.create_study(directions=["minimize", "maximize"], sampler=make_sampler(spec))
        for _ in range(8):
            t = study.ask(optuna_space(spec.space))
            p = t.params
            study.tell(t, [abs(math.log(p["temperature"])) + 10 * p["lr"], 100 - p["cl_weight"] - p["epochs"]])
        keys = [tuple(sorted(t.params.items())) for t in study.trials]
        repeats += len(keys) - len(set(keys))
    assert repeats == 0
