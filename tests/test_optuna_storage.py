"""The search's Optuna study in a real Optuna storage (a JournalStorage file), the same trials
and values as MLflow, through --resume; `search --warm-start`; optuna-dashboard on the journal.

Real Optuna, real Ray (Tune's OptunaSearch subclass; local Ray for the end-to-end searches),
real MLflow on SQLite, the real CLI in subprocesses. Each test has its own tmp dir and cache."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from coun_tune.search.runner import OPTUNA_JOURNAL, make_searcher, open_journal, study_journal
from coun_tune.search.samplers import ORPHANED, TUNE_TRIAL_ID
from tests._search_helpers import (
    OBJECTIVES,
    SEARCHED,
    child_env,
    cli_command,
    free_port,
    run_cli,
    stop_session,
    write_spec,
)


def load_journal(path: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=open_journal(str(path)))


def search_dir(root: Path, name: str) -> Path:
    (found,) = [p for p in (root / "results").iterdir() if p.name.startswith(name + "_")]
    return found


def mlflow_trials(db: Path, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("coun_tune.role") == "trial"]


def assert_journal_equals_mlflow(journal: Path, study_name: str, db: Path, experiment: str) -> list:
    """The study holds exactly the search's trials: one COMPLETE Optuna trial per finished
    MLflow trial run, tied by the Tune id, with the same config and objective values."""
    study = load_journal(journal, study_name)
    runs = mlflow_trials(db, experiment)
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * len(runs), [t.state.name for t in trials]
    by_tune_id = {t.user_attrs[TUNE_TRIAL_ID]: t for t in trials}
    assert sorted(by_tune_id) == sorted(r.data.tags["coun_tune.trial_id"] for r in runs)
    for r in runs:
        t = by_tune_id[r.data.tags["coun_tune.trial_id"]]
        for k in SEARCHED:
            assert math.isclose(float(r.data.params[k]), t.params[k], rel_tol=1e-9), (k, r.data.params[k], t.params)
        for k, v in zip(OBJECTIVES, t.values):
            assert math.isclose(r.data.metrics[k], v, rel_tol=1e-9, abs_tol=1e-12), (k, r.data.metrics[k], v)
    return trials


# --- the searcher's restore, in-process (real Optuna, Ray's OptunaSearch subclass) ----------


def _spec(tmp_path: Path):
    from coun_tune.config.search_spec import load_search_spec

    path = write_spec(
        tmp_path / "spec.yaml",
        "unit",
        cache_dir=tmp_path / "cache",
        storage_path=tmp_path / "results",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        sampler="random",
    )
    return load_search_spec(str(path))


def test_restored_searcher_writes_the_same_study_and_ends_what_its_checkpoint_missed(tmp_path):
    """A checkpoint taken with trials a and p running; after it, a is told, p is told pruned
    and b is asked (the interrupt comes before Tune's next snapshot). The searcher restored
    from the checkpoint reads and writes the same journal: Tune rerunning a and p changes
    nothing (no duplicate, no error), b (which Tune never ran) ends FAIL and marked, and new
    trials continue the numbers."""
    from coun_tune.tracking.trial_logger import EPOCHS_PLANNED

    spec = _spec(tmp_path)
    journal = tmp_path / "s" / OPTUNA_JOURNAL
    first = make_searcher(spec, "unit_1", str(journal))
    config_a = first.suggest("a")
    first.suggest("p")
    first.save(str(tmp_path / "searcher.pkl"))
    first.on_trial_complete("a", {"forget_gap": 1.0, "retain_acc": 90.0})
    first.on_trial_complete("p", {"forget_gap": 3.0, "retain_acc": 70.0, "epoch": 1, EPOCHS_PLANNED: 3})
    first.suggest("b")

    restored = make_searcher(spec, "unit_1", str(journal))
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("a", {"forget_gap": 5.0, "retain_acc": 50.0})  # Tune reran it
    restored.on_trial_complete("p", {"forget_gap": 4.0, "retain_acc": 60.0, "epoch": 2, EPOCHS_PLANNED: 3})
    restored.suggest("c")
    restored.on_trial_complete("c", {"forget_gap": 2.0, "retain_acc": 80.0})

    trials = load_journal(journal, "unit_1").get_trials()
    assert [(t.number, t.state.name, t.user_attrs.get(TUNE_TRIAL_ID)) for t in trials] == [
        (0, "COMPLETE", "a"),
        (1, "PRUNED", "p"),
        (2, "FAIL", "b"),
        (3, "COMPLETE", "c"),
    ]
    assert trials[0].values == [1.0, 90.0] and trials[0].params == config_a
    assert trials[1].user_attrs["pruned_at_epoch"] == 1
    assert trials[2].user_attrs.get(ORPHANED) is True
    assert trials[3].values == [2.0, 80.0]


def test_study_journal_lives_where_the_driver_can_write(tmp_path, monkeypatch):
    """Local storage_path: in the search's directory; s3:// storage_path: beside a SQLite MLflow
    store, else in the head's cache dir. Always an absolute path (the pickled study keeps it)."""
    from coun_tune.search.plan import SearchPlan

    spec = _spec(tmp_path)
    monkeypatch.chdir(tmp_path)
    local = SearchPlan(spec, "results/unit_20261202-000000", "sqlite:///x/mlflow.db", "", "d", False)
    assert study_journal(local) == str(tmp_path / "results" / "unit_20261202-000000" / OPTUNA_JOURNAL)
    s3 = SearchPlan(spec, "s3://bucket/runs/unit_1", f"sqlite:///{tmp_path}/db/mlflow.db", "", "d", False)
    assert study_journal(s3) == str(tmp_path / "db" / OPTUNA_JOURNAL)
    monkeypatch.setenv("COUN_TUNE_CACHE", str(tmp_path / "cache"))
    server = SearchPlan(spec, "s3://bucket/runs/unit_1", "http://127.0.0.1:5000", "", "d", False)
    assert study_journal(server) == str(tmp_path / "cache" / "optuna" / OPTUNA_JOURNAL)
