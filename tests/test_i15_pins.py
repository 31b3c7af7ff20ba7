"""Issue 15, item 3: behaviours no test pinned, each checked against a hand computation.

- the spec hash changes with every top-level key of a search spec (seed included);
- the knee is the front point nearest the ideal by *Euclidean* distance after min-max scaling
  (fronts where the L1 / Chebyshev distance or unscaled values pick another point);
- a strict `>` constraint is not `>=` (a front point exactly at the bound);
- `coun-tune export` leaves pruned trials out unless asked.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import yaml

from coun_tune import pareto
from coun_tune.config.search_spec import KEYS, validate_search_spec
from coun_tune.search.plan import spec_hash

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

OBJ = {"forget_gap": "min", "retain_acc": "max"}

# ------------------------------------------------------------------ the spec hash

# A spec giving every top-level key a value, and for each key another valid value.
FULL = {
    "name": "p",
    "scenario": {"dataset": "digits", "forget": "random:0.1", "seed": 0, "recipe": "tiny"},
    "method": "coun",
    "objectives": {"forget_gap": "min", "retain_acc": "max"},
    "space": {"temperature": {"log": [0.03, 0.3]}, "epochs": 2},
    "sampler": "nsga2",
    "num_samples": 2,
    "max_concurrent_trials": 2,
    "resources_per_trial": {"cpu": 1, "gpu": 0},
    "seed": 0,
    "storage_path": "./results",
    "tracking_uri": "sqlite:///a.db",
    "cache_dir": "./cache",
    "batch_size": 32,
    "mia_every": 0,
    "description": "a",
    "storage_endpoint": "http://127.0.0.1:9000",
    "scheduler": {"type": "mo_asha", "grace_epochs": 1, "reduction_factor": 2},
    "calibration": {"split_seeds": [0]},
    "holdout": {"split_seeds": [5]},
    "oracle_seeds": 1,
    "max_failures": 3,
    "checkpoint_every": 1,
}
OTHER = {
    "name": "q",
    "scenario": {"dataset": "digits", "forget": "random:0.2", "seed": 0, "recipe": "tiny"},
    "method": "ft",
    "objectives": {"forget_gap": "min", "test_acc": "max"},
    "space": {"temperature": {"log": [0.03, 0.2]}, "epochs": 2},
    "sampler": "tpe",
    "num_samples": 3,
    "max_concurrent_trials": 1,
    "resources_per_trial": {"cpu": 2, "gpu": 0},
    "seed": 1,
    "storage_path": "./elsewhere",
    "tracking_uri": "sqlite:///b.db",
    "cache_dir": "./cache2",
    "batch_size": 16,
    "mia_every": 1,
    "description": "b",
    "storage_endpoint": "http://127.0.0.1:9001",
    "scheduler": {"type": "mo_asha", "grace_epochs": 1, "reduction_factor": 3},
    "calibration": {"split_seeds": [0, 1]},
    "holdout": {"split_seeds": [6]},
    "oracle_seeds": 2,
    "max_failures": 5,
    "checkpoint_every": 2,
}


def test_every_top_level_key_is_covered_here():
    """A key added to the spec must be added above, so the hash test covers it too."""
    assert set(FULL) == set(OTHER) == KEYS


@pytest.mark.parametrize("key", sorted(KEYS))
def test_the_spec_hash_changes_with_every_top_level_key(key):
    base = validate_search_spec(dict(FULL))
    changed = validate_search_spec({**FULL, key: OTHER[key]})
    assert spec_hash(changed) != spec_hash(base), f"changing {key!r} left the spec hash unchanged"


def test_the_spec_hash_tells_every_changed_key_apart():
    hashes = {k: spec_hash(validate_search_spec({**FULL, k: OTHER[k]})) for k in KEYS}
    hashes["(none)"] = spec_hash(validate_search_spec(dict(FULL)))
    assert len(set(hashes.values())) == len(hashes)


def test_the_spec_hash_sees_seed_alone():
    """The Optuna sampler's seed is a top-level key of its own: a resumed search with another
    seed is another search."""
    a = validate_search_spec({**FULL, "seed": 0})
    b = validate_search_spec({**FULL, "seed": 7})
    assert spec_hash(a) != spec_hash(b)
    assert spec_hash(a) == spec_hash(validate_search_spec({**FULL, "seed": 0}))


# ------------------------------------------------------------------ the knee

# Fronts (forget_gap min, retain_acc max), forget_gap over [0, 10], retain_acc over [80, 100].
# Min-max scaled, minimised coordinates: s = (gap / 10, (100 - RA) / 20).
KNEE_CASES = [
    # (0,1) (0.1,0.8) (0.5,0.5) (1,0): L2 1, 0.806, 0.707, 1 -> index 2;
    #   L1 1, 0.9, 1.0, 1 -> index 1; unscaled |(gap, -RA)| 80, 84.0, 90.1, 100.5 -> index 0
    ([[0.0, 80.0], [1.0, 84.0], [5.0, 90.0], [10.0, 100.0]], 2),
    # (0,1) (0.05,0.7) (0.6,0.6) (1,0): L2 1, 0.702, 0.849, 1 -> index 1;
    #   Chebyshev 1, 0.7, 0.6, 1 -> index 2; L1 1, 0.75, 1.2, 1 -> index 1; unscaled -> index 0
    ([[0.0, 80.0], [0.5, 86.0], [6.0, 88.0], [10.0, 100.0]], 1),
]


@pytest.mark.parametrize("front,knee", KNEE_CASES)
def test_the_knee_is_euclidean_after_min_max_scaling(front, knee):
    v = np.array(front)
    assert pareto.non_dominated_mask(v, list(OBJ.values())).all()  # all four are on the front
    scaled = np.column_stack([v[:, 0] / 10.0, (100.0 - v[:, 1]) / 20.0])  # by hand, as above
    assert int(np.argmin(np.sqrt((scaled**2).sum(axis=1)))) == knee
    assert pareto.knee_index(v, list(OBJ.values())) == knee
    rows = [{"forget_gap": g, "retain_acc": r} for g, r in front]
    assert pareto.pick_index(rows, OBJ, "knee") == knee


def test_the_knee_ignores_units():
    """The same front in other units (forget_gap x 100, retain_acc shifted) has the same knee:
    the scaling is over the front, per objective."""
    v = np.array(KNEE_CASES[0][0])
    other = np.column_stack([v[:, 0] * 100.0, v[:, 1] - 50.0])
    assert pareto.knee_index(other, list(OBJ.values())) == KNEE_CASES[0][1]


# ------------------------------------------------------------------ strict constraints

# Front P0 (0,80), P1 (1,95), P2 (2,98), P3 (6,99.5), P4 (10,100); P1 sits exactly at 95.
#   retain_acc>=95 keeps P1..P4; rescaled over them: gap (0, 1/9, 5/9, 1), 100-RA over 5:
#     (1, 0.4, 0.1, 0) -> L2 1, 0.415, 0.564, 1 -> P2
#   retain_acc>95 keeps P2..P4; rescaled: gap (0, 0.5, 1), (1, 0.25, 0) -> 1, 0.559, 1 -> P3
#   retain_acc>=100 keeps P4 alone; retain_acc>100 keeps nothing (a usage error)
STRICT_ROWS = [
    {"forget_gap": 0.0, "retain_acc": 80.0},
    {"forget_gap": 1.0, "retain_acc": 95.0},
    {"forget_gap": 2.0, "retain_acc": 98.0},
    {"forget_gap": 6.0, "retain_acc": 99.5},
    {"forget_gap": 10.0, "retain_acc": 100.0},
]


@pytest.mark.parametrize(
    "pick,expected",
    [
        ("retain_acc>=95", 2),
        ("retain_acc>95", 3),
        ("retain_acc >= 95", 2),
        ("retain_acc > 95", 3),
        ("retain_acc>=100", 4),
    ],
)
def test_a_strict_constraint_is_not_its_inclusive_twin(pick, expected):
    assert pareto.pick_index(STRICT_ROWS, OBJ, pick) == expected


def test_strict_and_inclusive_parse_apart():
    assert pareto.parse_pick("retain_acc>95") == ("constraint", "retain_acc", ">", 95.0)
    assert pareto.parse_pick("retain_acc>=95") == ("constraint", "retain_acc", ">=", 95.0)
    assert pareto.parse_pick("forget_gap<1.5") == ("constraint", "forget_gap", "<", 1.5)
    assert pareto.parse_pick("forget_gap<=1.5") == ("constraint", "forget_gap", "<=", 1.5)


def test_a_strict_bound_no_point_passes_is_refused():
    from coun_tune.errors import UsageError

    with pytest.raises(UsageError, match="no Pareto trial satisfies"):
        pareto.pick_index(STRICT_ROWS, OBJ, "retain_acc>100")


# ------------------------------------------------------------------ export and pruned trials

# Trials (forget_gap, retain_acc); trial 2 was pruned by the scheduler (KILLED, pruned_at_epoch
# 1): its truncated metrics would make it the knee.
#   without trial 2 the front is 1 (0,80), 3 (2,98), 4 (6,99.5), 5 (10,100) [none dominated]:
#     scaled (0,1), (0.2,0.1), (0.6,0.025), (1,0) -> L2 1, 0.224, 0.601, 1 -> trial 3
#   with it, 2 (0.5,99) dominates 3; front 1, 2, 4, 5: (0,1), (0.05,0.05), (0.6,0.025), (1,0)
#     -> L2 1, 0.071, 0.601, 1 -> trial 2
PRUNED_TRIALS = [
    {"forget_gap": 0.0, "retain_acc": 80.0},
    {"forget_gap": 0.5, "retain_acc": 99.0},
    {"forget_gap": 2.0, "retain_acc": 98.0},
    {"forget_gap": 6.0, "retain_acc": 99.5},
    {"forget_gap": 10.0, "retain_acc": 100.0},
]


@pytest.fixture(scope="module")
def pruned_store(tmp_path_factory):
    from tests._fake_search import make_search

    root = tmp_path_factory.mktemp("pruned")
    uri, client, parent, run_ids = make_search(root, PRUNED_TRIALS, name="pruned_export")
    client.log_metric(run_ids[1], "pruned_at_epoch", 1, step=1)
    client.set_terminated(run_ids[1], status="KILLED")
    assert client.get_run(run_ids[1]).info.status == "KILLED"
    return root, uri, parent


def exported_lr(path) -> float:
    return yaml.safe_load(path.read_text())["hparams"]["lr"]  # trial i was given lr i / 100


def test_export_skips_pruned_trials_by_default(pruned_store, capsys):
    """Through the CLI (`coun-tune export`, no flag): the knee of the completed trials, trial 3."""
    from coun_tune.cli import main

    root, uri, parent = pruned_store
    out = root / "default.yaml"
    assert main(["export", parent, "--output", str(out), "--tracking-uri", uri]) == 0
    assert exported_lr(out) == pytest.approx(0.03)
    assert "trial 3" in capsys.readouterr().out


def test_export_includes_pruned_trials_only_when_asked(pruned_store):
    """Asked for (include_pruned=True), the pruned trial 2 is on the front and is its knee: so
    the default above really left it out."""
    try:
        from coun_tune.tracking.export import export_config
    except ImportError:  # before export moved out of review
        from coun_tune.tracking.review import export_config

    root, uri, parent = pruned_store
    from coun_tune.tracking.mlflow_store import client_for

    client = client_for(uri)
    default = export_config(client, parent, "knee", root / "d.yaml", register=False, stream=io.StringIO())
    assert exported_lr(default) == pytest.approx(0.03)
    asked = export_config(
        client, parent, "knee", root / "p.yaml", include_pruned=True, register=False, stream=io.StringIO()
    )
    assert exported_lr(asked) == pytest.approx(0.02)


# ------------------------------------------------------------------ renamed hyperparameters

# l1_epochs -> l1_fraction and scrub_max_steps -> scrub_max_fraction (shares of the run's
# epochs). An old config must run what it ran before (converted, one warning line) or be
# refused naming the new key: never run the new key's default silently.


def _build(hparams: dict, method: str, overrides: dict | None = None):
    from coun_tune.config.unlearn_config import build_unlearn_config

    said: list[str] = []
    cfg = build_unlearn_config({"method": method, "hparams": hparams}, overrides or {}, warn=said.append)
    return cfg, said


def old_l1_alpha(alpha0: float, n: int, epoch: int) -> float:
    """The l1 weight before the rename: alpha0 (1 - e / n) in the first n epochs, then 0."""
    return alpha0 * (1.0 - epoch / n) if epoch < n else 0.0


@pytest.mark.parametrize("n,epochs", [(4, 50), (4, 10), (1, 5), (3, 3), (2, 7)])
def test_an_old_l1_epochs_config_runs_what_it_ran(n, epochs):
    from coun_tune.core.methods.ft_variants import L1Sparse

    cfg, said = _build({"l1_epochs": n, "l1_alpha": 0.01, "epochs": epochs}, "l1_sparse")
    assert "l1_epochs" not in cfg.hparams and cfg.hparams["l1_fraction"] == pytest.approx(n / epochs)
    assert cfg.to_dict()["hparams"]["l1_fraction"] == pytest.approx(n / epochs)  # re-exported: the new name
    for e in range(epochs):  # the weight of every epoch, as the old code had it
        new = L1Sparse.alpha(0.01, cfg.hparams["l1_fraction"], epochs, e)
        assert new == pytest.approx(old_l1_alpha(0.01, n, e)), e
    assert len(said) == 1 and "\n" not in said[0]
    assert "l1_epochs" in said[0] and "l1_fraction" in said[0] and "deprecated" in said[0]


def test_an_old_l1_epochs_config_without_epochs_uses_the_default_epochs():
    cfg, said = _build({"l1_epochs": 4}, "l1_sparse")
    assert cfg.hparams["epochs"] == 10 and cfg.hparams["l1_fraction"] == pytest.approx(0.4)
    assert "of epochs 10" in said[0]


def test_the_command_line_epochs_is_the_run_s():
    cfg, said = _build({"l1_epochs": 2, "epochs": 50}, "l1_sparse", {"hparams": {"epochs": 4}})
    assert cfg.hparams["epochs"] == 4 and cfg.hparams["l1_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize("n,epochs,passes", [(2, 3, 2), (0, 5, 0), (5, 3, 3), (1, 50, 1), (10, 50, 10)])
def test_an_old_scrub_max_steps_config_runs_its_max_passes(n, epochs, passes):
    """The old rule: a max pass in epoch e (0-based) while e < scrub_max_steps, so min(n, epochs)
    passes; SCRUB.max_passes under the converted share must count the same."""
    from types import SimpleNamespace

    from coun_tune.core.methods.distill import SCRUB

    cfg, said = _build({"scrub_max_steps": n, "epochs": epochs}, "scrub")
    assert "scrub_max_steps" not in cfg.hparams
    ctx = SimpleNamespace(hparams=cfg.hparams, epochs=epochs)
    assert SCRUB.max_passes(ctx) == passes == min(n, epochs)
    assert len(said) == 1 and "scrub_max_fraction" in said[0]


@pytest.mark.parametrize(
    "hparams,method,match",
    [
        ({"l1_epochs": 20, "epochs": 10}, "l1_sparse", "l1_fraction"),  # the old decay over 20 of 10 has no equal
        ({"l1_epochs": 4, "l1_fraction": 0.5}, "l1_sparse", "both are given; keep 'l1_fraction'"),
        ({"scrub_max_steps": 2, "scrub_max_fraction": 0.2}, "scrub", "keep 'scrub_max_fraction'"),
        ({"l1_epochs": 2.5, "epochs": 10}, "l1_sparse", "renamed l1_fraction"),
        ({"scrub_max_steps": -1}, "scrub", "renamed scrub_max_fraction"),
        ({"l1_epochs": 4}, "ft", "no hyperparameter 'l1_epochs'"),  # a method without it: as any unknown name
    ],
)
def test_an_old_name_that_cannot_convert_is_refused_in_one_line(hparams, method, match):
    from coun_tune.errors import UsageError

    with pytest.raises(UsageError, match=match) as e:
        _build(hparams, method)
    assert "\n" not in str(e.value)


def test_the_cli_refuses_an_old_config_with_exit_2_naming_the_new_key(tmp_path, capsys, monkeypatch):
    from coun_tune.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COUN_TUNE_CACHE", str(tmp_path / "cache"))  # (were it not refused, nothing lands in ~)

    cfg = tmp_path / "old.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "scenario": {"dataset": "digits", "forget": "random:0.1", "seed": 0},
                "method": "l1_sparse",
                "hparams": {"l1_epochs": 20, "epochs": 10},
            }
        )
    )
    assert main(["unlearn", "--config", str(cfg), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coun-tune: error: ") and "l1_fraction" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.yaml"]  # nothing written


@pytest.mark.parametrize(
    "old,new,method", [("l1_epochs", "l1_fraction", "l1_sparse"), ("scrub_max_steps", "scrub_max_fraction", "scrub")]
)
@pytest.mark.parametrize("domain", [{"int": [1, 3]}, 2])
def test_a_search_spec_with_an_old_name_is_refused_naming_the_new_key(old, new, method, domain):
    """A searched (or fixed) old name in `space` has no single share of the epochs (each trial
    draws its own): refused, naming the new key, not the generic 'no hyperparameter'."""
    from coun_tune.errors import UsageError

    doc = {
        "name": "old",
        "scenario": {"dataset": "digits", "forget": "random:0.1", "seed": 0},
        "method": method,
        "objectives": {"forget_gap": "min", "retain_acc": "max"},
        "space": {old: domain, "lr": {"log": [0.01, 0.1]}, "epochs": {"int": [2, 5]}},
    }
    with pytest.raises(UsageError, match=rf"space\.{old}: renamed {new}.*search {new} in \[0, 1\]") as e:
        validate_search_spec(doc)
    assert "\n" not in str(e.value)


def test_the_old_flag_is_refused_with_exit_2_when_it_cannot_convert(tmp_path, capsys, monkeypatch):
    from coun_tune.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COUN_TUNE_CACHE", str(tmp_path / "cache"))
    args = ["unlearn", "--method", "l1_sparse", "--l1-epochs", "9", "--epochs", "4", "--output", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "l1_fraction" in err[0] and "9" in err[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_old_flag_runs_what_it_ran_with_one_warning(tmp_path, capsys, monkeypatch):
    """--scrub-max-steps 1 at --epochs 2: one max pass of two epochs, i.e. scrub_max_fraction 0.5
    in the written config, and one deprecation line."""
    from coun_tune.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COUN_TUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "o"
    args = ["unlearn", "--method", "scrub", "--scrub-max-steps", "1", "--epochs", "2", "--recipe", "tiny"]
    assert main([*args, "--device", "cpu", "--output", str(out)]) == 0
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["hparams"]["scrub_max_fraction"] == pytest.approx(0.5)
    assert "scrub_max_steps" not in written["hparams"]
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "deprecated" in ln]
    assert len(warned) == 1 and "scrub_max_steps" in warned[0] and "scrub_max_fraction 0.5" in warned[0]
