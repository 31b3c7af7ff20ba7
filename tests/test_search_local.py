"""A real search end to end: local Ray, real Optuna, a SQLite MLflow store, the real CLI.

One parent run, exactly one child per trial with params, metrics and a model artifact; the
`pareto` tags equal a brute-force non-dominated set; the exported YAML round-trips through
`coun-tune unlearn`; an interrupted search resumes into the same runs without duplicates."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

pytestmark = pytest.mark.slow

SPEC = """\
name: {name}
scenario: {{dataset: digits, forget: "random:0.1", seed: 0, recipe: tiny}}
method: coun
objectives: {{forget_gap: min, retain_acc: max}}
space:
  temperature: {{log: [0.03, 0.3]}}
  cl_weight: {{log: [0.1, 6.0]}}
  lr: {{log: [0.01, 0.1]}}
  epochs: {epochs}
sampler: {sampler}
num_samples: {n}
max_concurrent_trials: {conc}
resources_per_trial: {{cpu: 1, gpu: 0}}
seed: 0
storage_path: {root}/results
tracking_uri: sqlite:///{root}/mlflow.db
cache_dir: {root}/cache
"""


def env():
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}


def cli(args, cwd, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "coun_tune", *args], cwd=cwd, capture_output=True, text=True, env=env(), timeout=timeout
    )


def brute_force_front(points):
    """points: list of (forget_gap, retain_acc); forget_gap min, retain_acc max."""

    def dominates(a, b):
        return a[0] <= b[0] + 1e-9 and a[1] >= b[1] - 1e-9 and (a[0] < b[0] - 1e-9 or a[1] > b[1] + 1e-9)

    return [not any(dominates(q, p) for q in points) for p in points]


def runs_of(tracking_uri, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("coun_tune.role") == "search"]
    children = [r for r in runs if r.data.tags.get("coun_tune.role") == "trial"]
    return client, parents, children


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    (root / "spec.yaml").write_text(
        SPEC.format(name="local", epochs="{int: [1, 2]}", sampler="nsga2", n=4, conc=2, root=root)
    )
    proc = cli(["search", "spec.yaml"], root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc


def test_one_parent_one_child_per_trial(search):
    root, proc = search
    client, parents, children = runs_of(f"sqlite:///{root}/mlflow.db", "local")
    assert len(parents) == 1
    assert len(children) == 4
    assert len({c.data.tags["coun_tune.trial_id"] for c in children}) == 4
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert c.info.status == "FINISHED"
        assert {"temperature", "cl_weight", "lr", "epochs"} <= set(c.data.params)
        assert {"forget_gap", "retain_acc", "avg_gap", "mia_efficacy", "wall_seconds", "flops"} <= set(c.data.metrics)
        history = client.get_metric_history(c.info.run_id, "retain_acc")
        assert [m.step for m in history] == list(range(1, int(c.data.params["epochs"]) + 1))
        names = {a.path for a in client.list_artifacts(c.info.run_id, "model")}
        assert {"model/model.pt", "model/config.yaml", "model/metrics.json"} <= names


def test_trials_reuse_their_worker_processes(search):
    """Starting a trial's actor costs seconds (a Python process importing torch and Ray); with
    reuse_actors the 4 trials, 2 at a time, run in fewer processes than trials."""
    root, _ = search
    pids = {
        json.loads(line)["pid"]
        for f in root.glob("results/local*/unlearn_trial_*/result.json")
        for line in f.read_text().splitlines()
    }
    assert 1 <= len(pids) < 4, pids


def test_pareto_tags_match_brute_force(search):
    root, proc = search
    client, parents, children = runs_of(f"sqlite:///{root}/mlflow.db", "local")
    points = [(c.data.metrics["forget_gap"], c.data.metrics["retain_acc"]) for c in children]
    expected = brute_force_front(points)
    assert [c.data.tags["pareto"] == "true" for c in children] == expected
    parent = client.get_run(parents[0].info.run_id)
    assert parent.data.metrics["pareto_size"] == sum(expected)
    assert 0 <= parent.data.metrics["hypervolume"] <= 1  # the front's gain over doing nothing, normalised
    history = sorted(client.get_metric_history(parent.info.run_id, "hypervolume_history"), key=lambda h: h.step)
    assert [h.step for h in history] == list(range(1, len(children) + 1))  # one point per completed trial
    assert all(a.value <= b.value + 1e-12 for a, b in zip(history, history[1:]))  # a trial never loses volume
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "trials.parquet",
        "pareto.png",
        "pareto.html",
        "spec.yaml",
    }
    assert "Pareto front" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout


def test_export_round_trips_through_unlearn(search):
    root, _ = search
    uri = f"sqlite:///{root}/mlflow.db"
    proc = cli(["export", "local", "--pick", "best:retain_acc", "--tracking-uri", uri, "--output", "picked.yaml"], root)
    assert proc.returncode == 0, proc.stderr
    text = (root / "picked.yaml").read_text()
    trial_run = text.split("(MLflow run ")[1].split(")")[0]
    cfg = yaml.safe_load(text)
    assert cfg["method"] == "coun" and set(cfg["hparams"]) >= {"temperature", "cl_weight", "lr", "epochs"}
    proc = cli(
        [
            "unlearn",
            "--config",
            "picked.yaml",
            "--output",
            "replay",
            "--cache-dir",
            str(root / "cache"),
            "--threads",
            "1",
        ],
        root,
    )
    assert proc.returncode == 0, proc.stderr
    assert "loaded from cache" in proc.stderr  # the search's base models, not new ones
    replay = json.loads((root / "replay" / "metrics.json").read_text())["unlearned"]
    client, _, children = runs_of(uri, "local")
    trial = next(c for c in children if c.info.run_id == trial_run)
    for m in ("retain_acc", "forget_acc", "test_acc", "forget_gap"):
        # same seed, same thread count, same CPU: the replay reproduces the trial
        assert replay[m] == pytest.approx(trial.data.metrics[m], abs=1e-6), m


def test_interrupted_search_resumes_into_the_same_runs(tmp_path):
    root = tmp_path
    (root / "spec.yaml").write_text(SPEC.format(name="resumable", epochs=3, sampler="random", n=3, conc=1, root=root))
    proc = subprocess.Popen(
        [sys.executable, "-m", "coun_tune", "search", "spec.yaml"],
        cwd=root,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    db = root / "mlflow.db"
    deadline = time.time() + 240
    try:  # interrupt once the first trial is finished and the second has reported an epoch
        while time.time() < deadline:
            time.sleep(1)
            if db.is_file():
                with sqlite3.connect(db) as con:
                    done = con.execute("select count(*) from runs where status='FINISHED'").fetchone()[0]
                    steps = con.execute("select count(*) from metrics where key='retain_acc'").fetchone()[0]
                if done >= 1 and steps >= 4:
                    break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    resumed = cli(["search", "spec.yaml", "--resume"], root)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    client, parents, children = runs_of(f"sqlite:///{db}", "resumable")
    assert len(parents) == 1
    assert len(children) == 3 and len({c.data.tags["coun_tune.trial_id"] for c in children}) == 3
    for c in children:
        assert c.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "retain_acc")]
        assert sorted(steps) == [1, 2, 3], steps  # every epoch once: nothing lost, nothing twice


def test_transfer_reruns_the_front_on_held_out_forget_sets(search):
    """`coun-tune transfer` is the search's hold-out check, later: the calibration front re-run
    on the new split (Ray tasks), holdout_* on each front run, holdout.parquet with the
    original's rows as the do-nothing reference; export then picks on the hold-out values."""
    import pyarrow.parquet as pq

    root, _ = search
    uri = f"sqlite:///{root}/mlflow.db"
    proc = cli(
        ["transfer", "local", "--split-seeds", "1", "--tracking-uri", uri, "--cache-dir", str(root / "cache")], root
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hold-out check" in proc.stdout and "original (do nothing)" in proc.stdout
    client, parents, children = runs_of(uri, "local")
    front = [c for c in children if c.data.tags["pareto"] == "true"]
    local = client.download_artifacts(parents[0].info.run_id, "holdout.parquet", str(root))
    table = pq.read_table(local).to_pylist()
    trials = [r for r in table if r["key"] != "original"]
    assert sorted(r["key"] for r in trials) == sorted(c.info.run_id for c in front)
    assert all(r["split_seed"] == 1 for r in table)
    assert [r["split_seed"] for r in table if r["key"] == "original"] == [1]
    for c in front:
        mean = client.get_run(c.info.run_id).data.metrics["holdout_forget_gap_mean"]
        assert mean == pytest.approx(next(r["forget_gap"] for r in trials if r["key"] == c.info.run_id))
    out = root / "after_transfer.yaml"
    proc = cli(["export", "local", "--pick", "best:forget_gap", "--output", str(out), "--tracking-uri", uri], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    held = {c.info.run_id: client.get_run(c.info.run_id).data.metrics["holdout_forget_gap_mean"] for c in front}
    header = out.read_text()
    assert "picked on hold-out means over 1 forget sets" in header
    (picked,) = [run_id for run_id in held if run_id in header]
    assert held[picked] == min(held.values())  # the hold-out value, not the calibration one


def test_a_diverged_trial_fails_with_its_reason_and_the_search_goes_on(tmp_path):
    spec = SPEC.format(name="diverging", epochs=1, sampler="random", n=3, conc=2, root=tmp_path)
    # lr 1e6 makes the loss non-finite within an epoch (DivergedError); seed 0 draws both values
    spec = spec.replace("lr: {log: [0.01, 0.1]}", "lr: {choice: [0.05, 1000000.0]}")
    (tmp_path / "spec.yaml").write_text(spec)
    proc = cli(["search", "spec.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, parents, children = runs_of(f"sqlite:///{tmp_path}/mlflow.db", "diverging")
    assert len(children) == 3
    failed = [c for c in children if c.info.status == "FAILED"]
    done = [c for c in children if c.info.status == "FINISHED"]
    assert failed and done, [(c.data.params["lr"], c.info.status) for c in children]
    for c in failed:
        assert float(c.data.params["lr"]) == 1e6
        assert "DivergedError" in c.data.tags["error"] and "loss is" in c.data.tags["error"]
    assert all(float(c.data.params["lr"]) == 0.05 for c in done)
    assert {c.data.tags.get("pareto") for c in done} <= {"true", "false"} and "pareto" not in failed[0].data.tags
