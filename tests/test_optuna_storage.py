"""The search's Optuna study in a real Optuna storage (a JournalStorage file), the same trials
and values as MLflow, through --resume; `search --warm-start`; optuna-dashboard on the journal.

Real Optuna, real Ray (Tune's OptunaSearch subclass; local Ray for the end-to-end searches),
real MLflow on SQLite, the real CLI in subprocesses. Each test has its own tmp dir and cache."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from coun_tune.search.runner import OPTUNA_JOURNAL, make_searcher, open_journal, study_journal
from coun_tune.search.samplers import ORPHANED, TUNE_TRIAL_ID
from tests._search_helpers import (
    OBJECTIVES,
    SEARCHED,
    SPACE,
    child_env,
    free_port,
    run_cli,
    stop_session,
    write_spec,
)


def test_trial_notes_map_optuna_numbers_to_coun_tune_trials_and_hold_out_means():
    """Optuna's ask order and coun-tune's start order differ here (Tune ids b, a): the note of
    Optuna trial 0 must name trial 2 (run r2), by the Tune id, with its hold-out mean."""
    from coun_tune.search.study_notes import trial_notes

    rows = [
        {"trial_id": "a", "trial_number": "1", "run_id": "r1", "is_knee": 0.0, "is_pareto": 1.0},
        {
            "trial_id": "b",
            "trial_number": "2",
            "run_id": "r2",
            "is_knee": 1.0,
            "is_pareto": 1.0,
            "holdout_forget_gap_mean": 0.5,
            "holdout_forget_gap_std": 0.25,
            "holdout_retain_acc_mean": 99.0,
        },
        {"trial_id": "c", "trial_number": "3", "run_id": "r3"},  # never asked of Optuna: left out
    ]
    notes = trial_notes({"b": 0, "a": 1}, rows, ["forget_gap", "retain_acc"])
    assert notes == {
        "0": {
            "trial": "2",
            "run_id": "r2",
            "is_knee": True,
            "is_pareto": True,
            "holdout_forget_gap_mean": 0.5,
            "holdout_forget_gap_std": 0.25,
            "holdout_retain_acc_mean": 99.0,
        },
        "1": {"trial": "1", "run_id": "r1", "is_knee": False, "is_pareto": True},
    }


def load_journal(path: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=open_journal(str(path)))


def search_dir(root: Path, name: str) -> Path:
    (found,) = [p for p in (root / "results").iterdir() if p.name.startswith(name + "_")]
    return found


def mlflow_trials(db: Path, name: str, parent: str | None = None) -> list:
    """The trial runs of experiment `name` (of one search's parent run, if given)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    return [
        r
        for r in runs
        if r.data.tags.get("coun_tune.role") == "trial" and parent in (None, r.data.tags.get("mlflow.parentRunId"))
    ]


def assert_journal_equals_mlflow(
    journal: Path, study_name: str, db: Path, experiment: str, parent: str | None = None
) -> list:
    """The study holds exactly the search's trials: one COMPLETE Optuna trial per finished
    MLflow trial run, tied by the Tune id, with the same config and objective values."""
    study = load_journal(journal, study_name)
    runs = mlflow_trials(db, experiment, parent)
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


def test_a_warm_started_search_does_not_replay_the_searches_it_was_started_from(tmp_path):
    """The queued configs come first, then the sampler's own; with the spec's seed unchanged a
    search warm-started from an earlier run of the same spec would draw that run's configs
    again, the queued one among them (the sampler's seed is mixed with the queue)."""
    spec = _spec(tmp_path)
    earlier = make_searcher(spec)
    configs = [earlier.suggest(f"e{k}") for k in range(3)]
    warm = make_searcher(spec, warm_start=[configs[0]])
    got = [warm.suggest(f"w{k}") for k in range(3)]
    assert got[0] == configs[0]
    assert not any(c in configs for c in got[1:]), (configs, got)


def test_the_dashboard_command_works_pasted_or_says_how_to_install(tmp_path, monkeypatch):
    """The executable beside the interpreter by absolute path; without it, the pip line first."""
    from coun_tune.search.runner import dashboard_command

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    assert dashboard_command("/x/optuna.journal") == (
        f"{bin_dir}/python -m pip install optuna-dashboard && {bin_dir}/optuna-dashboard /x/optuna.journal"
    )
    (bin_dir / "optuna-dashboard").write_text("#!/bin/sh\n")
    (bin_dir / "optuna-dashboard").chmod(0o755)
    assert dashboard_command("/x/my study.journal") == f"{bin_dir}/optuna-dashboard '/x/my study.journal'"


# --- end to end: the real CLI, local Ray, MLflow on SQLite ---------------------------------


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One finished tiny search (3 trials of one epoch); its stdout."""
    root = tmp_path_factory.mktemp("optuna_storage")
    write_spec(
        root / "a.yaml",
        "wsa",
        cache_dir=root / "cache",
        storage_path=root / "results",
        tracking_uri=f"sqlite:///{root}/mlflow.db",
        num_samples=3,
    )
    proc = run_cli(["search", "a.yaml"], cwd=root, env=child_env(COUN_TUNE_CACHE=str(root / "ray")))
    return root, proc.stdout


@pytest.mark.slow
def test_the_journal_holds_exactly_the_searchs_trials(searched):
    root, stdout = searched
    exp = search_dir(root, "wsa")
    journal = exp / OPTUNA_JOURNAL
    assert_journal_equals_mlflow(journal, exp.name, root / "mlflow.db", "wsa")
    study = load_journal(journal, exp.name)
    assert study.metric_names == list(OBJECTIVES)  # optuna-dashboard names the axes
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp_id = client.get_experiment_by_name("wsa").experiment_id
    (parent,) = client.search_runs([exp_id], filter_string="tags.`coun_tune.role` = 'search'")
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert study.user_attrs["mlflow_experiment_id"] == exp_id
    assert study.user_attrs["mlflow_tracking_uri"] == f"sqlite:///{root}/mlflow.db"
    line = next(x for x in stdout.splitlines() if x.startswith("optuna study "))
    dashboard = Path(sys.executable).absolute().with_name("optuna-dashboard")
    assert line == f"optuna study {exp.name}: {journal}; view it: {dashboard} {journal}", line
    # one trial identity: the study names each Optuna trial's coun-tune number and MLflow run,
    # derived here independently through the Tune id both sides record
    by_tune_id = {r.data.tags["coun_tune.trial_id"]: r for r in mlflow_trials(root / "mlflow.db", "wsa")}
    expected = {
        str(t.number): (
            by_tune_id[t.user_attrs[TUNE_TRIAL_ID]].data.tags["coun_tune.trial_number"],
            by_tune_id[t.user_attrs[TUNE_TRIAL_ID]].info.run_id,
            by_tune_id[t.user_attrs[TUNE_TRIAL_ID]].data.metrics["is_knee"] == 1.0,
        )
        for t in study.trials
        if t.state.name == "COMPLETE"
    }
    notes = study.user_attrs["coun_tune_trials"]
    assert {k: (v["trial"], v["run_id"], v["is_knee"]) for k, v in notes.items()} == expected
    assert sum(v["is_knee"] for v in notes.values()) == 1


@pytest.mark.slow
def test_one_line_refusals_of_warm_start_write_nothing(searched, tmp_path):
    """No such experiment, a search with no completed trial, a front outside this spec's
    space (the parameter named), --resume with it: exit 2, one line, no search started."""
    from mlflow.tracking import MlflowClient

    root, _ = searched
    db = root / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    if client.get_experiment_by_name("empty") is None:
        empty = client.create_experiment("empty")
        client.create_run(empty, tags={"coun_tune.role": "search"})
    before = sorted(e.name for e in client.search_experiments())

    def refused(name: str, warm: str, *args: str, **space) -> str:
        spec = write_spec(
            tmp_path / f"{name}.yaml",
            name,
            cache_dir=tmp_path / "cache",
            storage_path=tmp_path / "results",
            tracking_uri=f"sqlite:///{db}",
            **({"space": space} if space else {}),
        )
        proc = run_cli(["search", str(spec), "--warm-start", warm, *args], cwd=tmp_path, expect_rc=2, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and not proc.stdout.strip(), (proc.stdout, proc.stderr)
        return lines[0]

    line = refused("c1", "nosuch")
    assert "--warm-start nosuch: no MLflow experiment" in line, line
    assert "no completed trial" in refused("c3", "empty")
    narrow = {"temperature": {"log": [0.03, 0.3]}, "cl_weight": {"log": [0.1, 6.0]}, "lr": {"log": [0.2, 0.5]}}
    line = refused("c4", "wsa", **{**narrow, "epochs": 1})
    assert "lr=" in line and "outside this spec's space [0.2, 0.5]" in line, line
    assert "--resume" in refused("c5", "wsa", "--resume")
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()
    assert sorted(e.name for e in client.search_experiments()) == before


@pytest.mark.slow
def test_a_warm_started_search_runs_the_other_fronts_configs_first(searched, tmp_path):
    from coun_tune.pareto import non_dominated_mask

    root, _ = searched
    db = root / "mlflow.db"
    runs = sorted(mlflow_trials(db, "wsa"), key=lambda r: int(r.data.tags["coun_tune.trial_number"]))
    values = [[r.data.metrics[k] for k in OBJECTIVES] for r in runs]
    on_front = non_dominated_mask(values, list(OBJECTIVES.values()))
    front = [{k: float(r.data.params[k]) for k in SEARCHED} for r, on in zip(runs, on_front) if on]
    assert 1 <= len(front) < 3  # the warm start leaves the sampler a trial of its own

    write_spec(
        tmp_path / "b.yaml",
        "wsb",
        cache_dir=root / "cache",
        storage_path=tmp_path / "results",
        tracking_uri=f"sqlite:///{db}",
        num_samples=3,
    )
    proc = run_cli(
        ["search", "b.yaml", "--warm-start", "wsa"], cwd=tmp_path, env=child_env(COUN_TUNE_CACHE=str(tmp_path / "ray"))
    )
    numbers = [r.data.tags["coun_tune.trial_number"] for r, on in zip(runs, on_front) if on]
    plural, trials = "s" if len(front) != 1 else "", ", ".join(numbers)
    line = f"warm start: {len(front)} Pareto config{plural} of wsa (its trials {trials}; front on calibration values)"
    assert line + " run first" in proc.stdout.splitlines(), proc.stdout[:2000]
    exp = search_dir(tmp_path, "wsb")
    trials = assert_journal_equals_mlflow(exp / OPTUNA_JOURNAL, exp.name, db, "wsb")
    assert [t.params for t in trials[: len(front)]] == front
    assert all("fixed_params" in t.system_attrs for t in trials[: len(front)])  # enqueued, not sampled
    assert "fixed_params" not in trials[-1].system_attrs


@pytest.mark.slow
def test_a_resumed_search_keeps_the_journal_equal_to_mlflow(tmp_path):
    """Ctrl-C while the last trial runs (epoch 1 of 2), then --resume: one study, every trial
    once, COMPLETE with the values MLflow holds; the resumed trial kept its Optuna trial."""
    from coun_tune.search.progress import TEST_SIGINT_ENV

    write_spec(
        tmp_path / "r.yaml",
        "wsr",
        cache_dir=tmp_path / "cache",
        storage_path=tmp_path / "results",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        num_samples=3,
        max_concurrent_trials=1,
        space={**{k: v for k, v in SPACE.items() if k != "epochs"}, "epochs": 2},
    )
    ray_cache = str(tmp_path / "ray")
    run_cli(
        ["search", "r.yaml"],
        cwd=tmp_path,
        env=child_env(COUN_TUNE_CACHE=ray_cache, **{TEST_SIGINT_ENV: "1"}),
        expect_rc=130,
    )
    exp = search_dir(tmp_path, "wsr")
    interrupted = load_journal(exp / OPTUNA_JOURNAL, exp.name).get_trials()
    assert [t.state.name for t in interrupted] == ["COMPLETE", "COMPLETE", "RUNNING"]
    run_cli(["search", "r.yaml", "--resume"], cwd=tmp_path, env=child_env(COUN_TUNE_CACHE=ray_cache))
    trials = assert_journal_equals_mlflow(exp / OPTUNA_JOURNAL, exp.name, tmp_path / "mlflow.db", "wsr")
    assert len(trials) == 3
    assert [t.params for t in trials] == [t.params for t in interrupted]


@pytest.mark.slow
def test_optuna_dashboard_serves_the_study_from_the_journal(searched):
    """optuna-dashboard (the optional extra), started on 127.0.0.1 on the printed journal,
    lists the study with its trials within 30 s."""
    exe = Path(sys.executable).absolute().with_name("optuna-dashboard")
    # the test extra installs it: a missing executable is a broken install, not a reason to skip
    assert exe.is_file(), "optuna-dashboard is not installed (pip install -e '.[test]' installs it)"
    root, _ = searched
    exp = search_dir(root, "wsa")
    port = free_port()
    proc = subprocess.Popen(
        [str(exe), "--host", "127.0.0.1", "--port", str(port), str(exp / OPTUNA_JOURNAL)],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline, studies = time.time() + 30, None
        while time.time() < deadline and studies is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.loads(r.read())["study_summaries"]
            except OSError:
                time.sleep(0.5)
        assert studies is not None, "optuna-dashboard did not answer within 30 s"
        assert [(s["study_name"], len(s["directions"])) for s in studies] == [(exp.name, 2)]
    finally:
        stop_session(proc.pid, grace=5)


@pytest.mark.slow
def test_two_searches_started_at_once_keep_their_own_studies(tmp_path):
    """The same spec started twice in the same second: two directories, two studies named
    after them, each holding its own search's trials and nothing of the other's."""
    import threading

    write_spec(
        tmp_path / "t.yaml",
        "wst",
        cache_dir=tmp_path / "cache",
        storage_path=tmp_path / "results",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        num_samples=1,
        max_concurrent_trials=1,
    )
    env = child_env(COUN_TUNE_CACHE=str(tmp_path / "ray"))
    done = {}

    def go(k):
        try:
            done[k] = run_cli(["search", "t.yaml"], cwd=tmp_path, env=env)
        except BaseException as e:  # pytest.fail in a thread: hand it to the test
            done[k] = e

    threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [r for r in done.values() if isinstance(r, BaseException)], done
    dirs = sorted((tmp_path / "results").iterdir())
    assert len(dirs) == 2
    tune_ids = []
    for d in dirs:
        parent = json.loads((d / "coun_tune_search.json").read_text())["parent_run_id"]
        trials = assert_journal_equals_mlflow(d / OPTUNA_JOURNAL, d.name, tmp_path / "mlflow.db", "wst", parent)
        assert len(trials) == 1
        tune_ids.append(trials[0].user_attrs[TUNE_TRIAL_ID])
    assert tune_ids[0] != tune_ids[1]
