"""The MLflow trial logger (a Tune Callback on the driver) driven by hand with fake trial
objects against a real SQLite MLflow store: no Ray run, every event in a fixed order.

A driver crash is simulated as Tune sees it: a new logger built from the state Tune saved with
its experiment (get_state at some earlier moment), with MLflow holding whatever was logged
after that moment.

The logger writes from a thread of its own (tracking.writer): `flush()` waits for what was
handed to it, where a test reads MLflow (or a snapshot is meant to follow the writes)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from coun_tune.tracking.mlflow_store import PARENT, ROLE, TRIAL_ID, client_for, ensure_experiment
from coun_tune.tracking.trial_logger import MLflowTrialLogger

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes seconds); every test works in
    an experiment of its own."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    return uri, client_for(uri)


@pytest.fixture
def search(store, request):
    uri, client = store
    exp = ensure_experiment(client, uri, request.node.name)
    parent = client.create_run(exp, tags={ROLE: "search"}).info.run_id
    return uri, client, exp, parent


def fake_trial(trial_id: str, planned: int = 3, **config):
    return SimpleNamespace(
        trial_id=trial_id,
        config={"lr": 0.05, "epochs": planned, **config},
        last_result={},
        checkpoint=None,
        error_file=None,
        status="RUNNING",
    )


def result(epoch: int, planned: int = 3, acc: float | None = None) -> dict:
    # distinct values per epoch, so "logged once" also means "the first value kept"
    return {
        "epoch": epoch,
        "epochs_planned": planned,
        "retain_acc": acc if acc is not None else 90.0 + epoch,
        "forget_gap": 10.0 - epoch,
        "training_iteration": epoch,
        "done": False,
    }


def feed(logger, trial, epochs, planned=3, acc=None):
    for e in epochs:
        r = result(e, planned, acc)
        logger.on_trial_result(0, [trial], trial, r)
        trial.last_result = r


def history(client, run_id, key="retain_acc"):
    ms = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [(m.step, m.value) for m in ms]


def trial_runs(client, exp, parent, trial_id=None):
    f = f"tags.`{PARENT}` = '{parent}'" + (f" and tags.`{TRIAL_ID}` = '{trial_id}'" if trial_id else "")
    return client.search_runs([exp], filter_string=f)


def test_epochs_repeated_after_a_restore_are_logged_once(search):
    uri, client, exp, parent = search
    first = MLflowTrialLogger(uri, exp, parent, {"method": "coun"})
    t = fake_trial("t1", planned=4)
    first.on_trial_start(0, [t], t)
    feed(first, t, [1])
    assert first.flush() == 0
    saved = first.get_state()  # Tune's experiment snapshot after epoch 1 ...
    feed(first, t, [2, 3])  # ... then two more epochs reach MLflow before the driver dies
    assert first.flush() == 0
    run_id = saved["runs"]["t1"]

    second = MLflowTrialLogger(uri, exp, parent, {"method": "coun"})
    second.set_state(saved)
    t = fake_trial("t1", planned=4)
    second.on_trial_start(0, [t], t)
    assert second.flush() == 0
    assert client.get_run(run_id).info.status == "RUNNING"
    # restored from the epoch-1 checkpoint: epochs 2 and 3 come again (other values: a GPU
    # need not reproduce them bit for bit), then epoch 4 is new
    feed(second, t, [2, 3], planned=4, acc=50.0)
    feed(second, t, [4], planned=4)
    second.on_trial_complete(0, [t], t)
    assert second.flush() == 0

    assert history(client, run_id) == [(1, 91.0), (2, 92.0), (3, 93.0), (4, 94.0)]
    assert [s for s, _ in history(client, run_id, "forget_gap")] == [1, 2, 3, 4]
    assert len(trial_runs(client, exp, parent)) == 1
    assert client.get_run(run_id).info.status == "FINISHED"


def test_an_orphaned_run_of_a_dead_driver_is_adopted_not_duplicated(search):
    uri, client, exp, parent = search
    first = MLflowTrialLogger(uri, exp, parent, {"method": "coun"})
    saved = first.get_state()  # snapshot before the trial started: the map does not know t2
    t = fake_trial("t2")
    first.on_trial_start(0, [t], t)
    feed(first, t, [1])
    assert first.flush() == 0
    orphan = first.runs["t2"]
    assert client.get_run(orphan).info.status == "RUNNING"  # the driver dies here

    # a run of another search with the same Tune trial id must not be taken
    other_parent = client.create_run(exp, tags={ROLE: "search"}).info.run_id
    stranger = client.create_run(exp, tags={PARENT: other_parent, ROLE: "trial", TRIAL_ID: "t2"}).info.run_id

    second = MLflowTrialLogger(uri, exp, parent, {"method": "coun"})
    second.set_state(saved)
    t = fake_trial("t2")
    second.on_trial_start(0, [t], t)
    assert second.flush() == 0
    assert second.runs["t2"] == orphan
    feed(second, t, [1, 2, 3])  # epoch 1 again (no checkpoint survived), then the rest
    second.on_trial_complete(0, [t], t)
    assert second.flush() == 0

    runs = trial_runs(client, exp, parent, "t2")
    assert [r.info.run_id for r in runs] == [orphan]
    assert client.get_run(orphan).info.status == "FINISHED"
    assert [s for s, _ in history(client, orphan)] == [1, 2, 3]
    assert client.get_run(stranger).info.status == "RUNNING"
    assert history(client, stranger) == []


def test_a_pruned_trial_ends_killed_with_its_epoch(search, tmp_path):
    from ray.tune import Checkpoint

    from coun_tune.tracking.review import trial_rows

    uri, client, exp, parent = search
    logger = MLflowTrialLogger(uri, exp, parent, {"method": "coun"})
    pruned, full = fake_trial("p", planned=9), fake_trial("f", planned=3)
    (tmp_path / "config.yaml").write_text("method: coun\n")
    (tmp_path / "model.pt").write_bytes(b"weights")
    pruned.checkpoint = Checkpoint.from_directory(str(tmp_path))
    for t, epochs, planned in ((pruned, [1, 2, 3], 9), (full, [1, 2, 3], 3)):
        logger.on_trial_start(0, [t], t)
        feed(logger, t, epochs, planned)
        logger.on_trial_complete(0, [t], t)  # the scheduler stopped "p" at its epoch-3 rung
    assert logger.flush() == 0

    p = client.get_run(logger.runs["p"])
    assert p.info.status == "KILLED"
    assert p.data.metrics["pruned_at_epoch"] == 3 and p.data.tags["pruned_at_epoch"] == "3"
    assert p.data.tags["status"] == "pruned"
    # its config (to re-run at full budget), not its truncated model
    assert [a.path for a in client.list_artifacts(p.info.run_id, "model")] == ["model/config.yaml"]
    f = client.get_run(logger.runs["f"])
    assert f.info.status == "FINISHED" and "pruned_at_epoch" not in f.data.metrics
    assert f.data.tags["status"] == "completed"
    # the review and export read only what ran its budget, unless asked
    parent_run = client.get_run(parent)
    assert [r["trial_id"] for r in trial_rows(client, parent_run)] == ["f"]
    assert sorted(r["trial_id"] for r in trial_rows(client, parent_run, include_pruned=True)) == ["f", "p"]


def test_a_failed_trial_ends_failed_with_its_reason(search, tmp_path):
    uri, client, exp, parent = search
    logger = MLflowTrialLogger(uri, exp, parent, {"method": "coun"})
    t = fake_trial("e")
    logger.on_trial_start(0, [t], t)
    feed(logger, t, [1])
    (tmp_path / "error.txt").write_text("Traceback ...\n\nDivergedError: loss is nan at epoch 2, step 3\n")
    t.error_file = str(tmp_path / "error.txt")
    logger.on_trial_error(0, [t], t)
    assert logger.flush() == 0
    run = client.get_run(logger.runs["e"])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "DivergedError: loss is nan at epoch 2, step 3"


def test_a_completed_trials_model_is_named_by_its_trial_with_its_final_metrics(search, tmp_path):
    import json

    import torch
    import yaml
    from ray.tune import Checkpoint

    from coun_tune.tracking.models import logged_model_of
    from tests._fake_search import SCENARIO, trial_weights

    uri, client, exp, parent = search
    logger = MLflowTrialLogger(uri, exp, parent, {"method": "coun"})
    first, second = fake_trial("a", planned=2), fake_trial("b", planned=2, lr=0.02)
    torch.save(trial_weights(2), tmp_path / "model.pt")
    config = {"scenario": SCENARIO, "method": "coun", "hparams": {"lr": 0.02, "epochs": 2}, "seed": 0}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "metrics.json").write_text(json.dumps({"retain_acc": 92.0, "forget_gap": 8.0}))
    second.checkpoint = Checkpoint.from_directory(str(tmp_path))
    for t in (first, second):
        logger.on_trial_start(0, [t], t)
    feed(logger, second, [1, 2], planned=2)
    logger.on_trial_complete(0, [second], second)
    assert logger.flush() == 0

    run_id = logger.runs["b"]
    model = logged_model_of(client, run_id)
    assert model.name == "trial_2"  # the second trial started: its number, as in its run name
    assert client.get_run(run_id).info.run_name.startswith("trial 2 ")
    assert {m.key: (m.step, m.value) for m in model.metrics} == {"retain_acc": (2, 92.0), "forget_gap": (2, 8.0)}
    assert model.params["lr"] == "0.02" and model.params["temperature"]  # sampled and defaulted hparams
    assert history(client, run_id) == [(1, 91.0), (2, 92.0)]  # the run's curve gains no point
