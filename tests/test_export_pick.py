"""`coun-tune export` writes (and registers) the trial it picked, on a real SQLite store with
trials of known metrics, against picks worked out by hand.

Trials (forget_gap min, retain_acc max; test_acc is not an objective):
  1: (0, 80)  front      test_acc 90
  2: (1, 95)  front      test_acc 93
  3: (2, 98)  front      test_acc 92
  4: (4, 99.5) front     test_acc 91
  5: (3, 90)  dominated by 2 and 3, test_acc 99.9 (the best test_acc, but off the front)
  6: (5, 99)  dominated by 4; satisfies retain_acc>=95 too
knee: min-max scale the front: forget_gap (0, .25, .5, 1); -retain_acc ((-80+99.5)/19.5 = 1,
  4.5/19.5, 1.5/19.5, 0); distances to the origin 1, 0.340, 0.506, 1 -> trial 2.
retain_acc>=95 holds on front trials 2, 3, 4 (and dominated 6, never picked); the documented rule
  is the knee of the satisfying front points: rescaled over {2, 3, 4}: (0, 1), (1/3, 1/3), (1, 0)
  -> distances 1, 0.471, 1 -> trial 3 (neither the overall knee, nor the best, nor the first).
best:test_acc -> 2 (the front's best 93; trial 5's 99.9 is off the front).
best:retain_acc -> 4; best:forget_gap -> 1.
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from tests._fake_search import make_search, trial_weights

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TRIALS = [
    {"forget_gap": 0.0, "retain_acc": 80.0, "test_acc": 90.0},
    {"forget_gap": 1.0, "retain_acc": 95.0, "test_acc": 93.0},
    {"forget_gap": 2.0, "retain_acc": 98.0, "test_acc": 92.0},
    {"forget_gap": 4.0, "retain_acc": 99.5, "test_acc": 91.0},
    {"forget_gap": 3.0, "retain_acc": 90.0, "test_acc": 99.9},
    {"forget_gap": 5.0, "retain_acc": 99.0, "test_acc": 91.0},
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return (root, *make_search(root, TRIALS, name="exportable"))


def exported_trial(text: str, run_ids: list[str]) -> int:
    run = text.split("(MLflow run ", 1)[1].split(")", 1)[0]
    return run_ids.index(run) + 1


@pytest.mark.parametrize(
    "pick,trial,alias",
    [
        ("knee", 2, "knee"),
        ("retain_acc>=95", 3, "retain_acc_ge_95"),
        ("best:test_acc", 2, "best_test_acc"),
        ("best:retain_acc", 4, "best_retain_acc"),
        ("best:forget_gap", 1, "best_forget_gap"),
    ],
)
def test_export_writes_and_registers_the_picked_trial(store, pick, trial, alias):
    from coun_tune.tracking.export import export_config, exported_model_uri
    from coun_tune.tracking.models import load_model_uri

    root, uri, client, parent, run_ids = store
    out = export_config(client, parent, pick, root / f"{alias}.yaml")
    text = out.read_text()
    assert exported_trial(text, run_ids) == trial
    cfg = yaml.safe_load(text)
    assert cfg["hparams"]["lr"] == pytest.approx(trial / 100)  # the trial's own config
    assert cfg["hparams"]["temperature"] == 0.1 and cfg["hparams"]["cl_weight"] == 1.0  # defaults written out
    # registered under the experiment's name, the alias naming the pick, recorded in the YAML
    version_uri = exported_model_uri(out)
    assert version_uri.startswith("models:/exportable/")
    assert f"models:/exportable@{alias}" in text
    for model_uri in (version_uri, f"models:/exportable@{alias}"):
        state, info = load_model_uri(model_uri, uri)
        expected = trial_weights(trial)
        assert all(torch.equal(state[k], expected[k]) for k in expected), model_uri
        assert info["hparams"]["lr"] == pytest.approx(trial / 100)
    assert client.get_model_version_by_alias("exportable", alias).run_id == run_ids[trial - 1]


def test_exported_yaml_runs_through_the_unlearn_config_loader(store):
    from coun_tune.config.unlearn_config import build_unlearn_config, read_yaml
    from coun_tune.tracking.export import export_config

    root, uri, client, parent, run_ids = store
    out = export_config(client, parent, "knee", root / "knee_only.yaml", register=False)
    cfg = build_unlearn_config(read_yaml(out), {})
    assert cfg.method == "coun" and cfg.hparams["lr"] == pytest.approx(0.02)
    assert "model_uri" not in out.read_text()


def test_exporting_twice_reuses_the_model_version(store):
    from coun_tune.tracking.export import export_config, exported_model_uri

    root, uri, client, parent, run_ids = store
    first = exported_model_uri(export_config(client, parent, "knee", root / "a.yaml"))
    again = exported_model_uri(export_config(client, parent, "knee", root / "b.yaml"))
    assert first == again


def test_a_constraint_no_front_point_meets_is_a_usage_error(store):
    from coun_tune.errors import UsageError
    from coun_tune.tracking.export import export_config

    root, uri, client, parent, run_ids = store
    with pytest.raises(UsageError, match="no Pareto trial satisfies"):
        export_config(client, parent, "retain_acc>=99.9", root / "none.yaml")
    assert not (root / "none.yaml").exists()


def test_model_uris_resolve_through_the_given_store_only(store, tmp_path, monkeypatch):
    """MLflow's own models:/ and runs:/ resolution reads the process-global tracking URI (and
    creates ./mlflow.db); ours must use the store it is given, and say what is wrong in one line."""
    from coun_tune.errors import UsageError
    from coun_tune.tracking.export import export_config
    from coun_tune.tracking.models import MODEL_NAME, load_model_uri

    root, uri, client, parent, run_ids = store
    monkeypatch.chdir(tmp_path)
    export_config(client, parent, "best:retain_acc", tmp_path / "p.yaml")
    uris = ("models:/exportable@best_retain_acc", f"runs:/{run_ids[3]}/{MODEL_NAME}", f"runs:/{run_ids[3]}/model")
    for model_uri in uris:
        state, _ = load_model_uri(model_uri, uri)
        assert torch.equal(state["fc.weight"], trial_weights(4)["fc.weight"]), model_uri
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    for bad in (
        "models:/exportable@nope",
        "models:/missing/1",
        "runs:/0123/model",
        "s3://bucket/model.pt",
        "models:/exportable",
    ):
        with pytest.raises(UsageError):
            load_model_uri(bad, uri)


def test_export_prints_the_trial_its_objective_values_and_the_registered_model(store):
    """The printed line names the trial by its run's number, its objective values (knee =
    trial 2: forget_gap 1, retain_acc 95, by hand above) and the version and alias URIs the
    registry resolves; without registering, it says so."""
    import io

    from coun_tune.tracking.export import export_config, exported_model_uri

    root, uri, client, parent, run_ids = store
    said = io.StringIO()
    out = export_config(client, parent, "knee", root / "printed.yaml", stream=said)
    version_uri = exported_model_uri(out)
    first, second = said.getvalue().splitlines()
    assert first.startswith("export: trial 2 (forget_gap 1.00, retain_acc 95.00; calibration values), picked on")
    assert second.strip() == f"registered model {version_uri} (alias models:/exportable@knee)"
    version = client.get_model_version("exportable", version_uri.rsplit("/", 1)[1])
    assert version.run_id == run_ids[1]
    said = io.StringIO()
    export_config(client, parent, "best:retain_acc", root / "unregistered.yaml", register=False, stream=said)
    assert said.getvalue().startswith("export: trial 4 (forget_gap 4.00, retain_acc 99.50;")
    assert "model not registered" in said.getvalue()
