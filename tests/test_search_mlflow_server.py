"""End to end against a REAL MLflow tracking server: `coun-tune search --tracking-uri http://...`
(local Ray, in a subprocess so no Ray state leaks into pytest), then the MLflow contents are
checked through MlflowClient, then `coun-tune export --pick knee` and `coun-tune unlearn
--config` reproduce the exported trial.

The server: `mlflow server` with a SQLite backend and proxied artifact storage
(--artifacts-destination), one worker, job execution off, bound to 127.0.0.1 on a free port;
stopped with SIGTERM to its PID in teardown (plus a sweep of its session, by PID).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from _search_helpers import (
    OBJECTIVES,
    SEARCHED,
    brute_force_front,
    child_env,
    free_port,
    run_cli,
    stop_session,
    write_spec,
)

SERVER_START_TIMEOUT = 90  # ~6 s on an idle 2-core machine; other people's jobs share the cores
NUM_SAMPLES = 3


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    env = child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'srv.db'}",
                "--artifacts-destination",
                str(root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _healthy(url):
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited {proc.returncode} before it was healthy:\n"
                    f"{log_path.read_text(errors='replace')[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not healthy after {SERVER_START_TIMEOUT} s:\n"
                    f"{log_path.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.5)
        yield {"url": url, "root": root, "artifacts": root / "artifacts"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        stop_session(proc.pid, grace=5)  # a uvicorn worker that outlived its parent, if any


def test_brute_force_front_helper():
    pts = {
        "a": {"forget_gap": 1.0, "retain_acc": 90.0},
        "b": {"forget_gap": 2.0, "retain_acc": 95.0},
        "c": {"forget_gap": 2.0, "retain_acc": 94.0},
        "d": {"forget_gap": 1.0, "retain_acc": 90.0},
        "e": {"forget_gap": 0.5, "retain_acc": 80.0},
        "f": {"forget_gap": 3.0, "retain_acc": 95.0},
    }
    assert brute_force_front(pts, OBJECTIVES) == {"a", "b", "d", "e"}
    assert brute_force_front(pts, {"forget_gap": "max", "retain_acc": "min"}) == {"a", "c", "d", "e", "f"}
    # float noise ties: equal gaps along different float paths; the higher retain_acc dominates
    noisy = {
        "x": {"forget_gap": 1.3888888888889, "retain_acc": 98.8},
        "y": {"forget_gap": 1.3888888888888715, "retain_acc": 96.9},
    }
    assert brute_force_front(noisy, OBJECTIVES) == {"x"}


@pytest.mark.slow
def test_search_logs_to_mlflow_server_then_export_and_unlearn(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    url = mlflow_server["url"]
    name = "srv_search"
    cache = tmp_path / "cache"
    decoy_db = tmp_path / "spec_tracking.db"  # the spec's own URI: --tracking-uri must win over it
    spec = write_spec(
        tmp_path / "spec.yaml",
        name,
        cache_dir=cache,
        storage_path=tmp_path / "results",
        tracking_uri=f"sqlite:///{decoy_db}",
        num_samples=NUM_SAMPLES,
        max_concurrent_trials=2,
    )

    t0 = time.monotonic()
    search = run_cli(["search", str(spec), "--tracking-uri", url], cwd=tmp_path, timeout=900)
    search_s = time.monotonic() - t0
    assert not decoy_db.exists(), "the search wrote to the spec's tracking_uri despite --tracking-uri"
    assert "Pareto front" in search.stdout
    assert "View run" not in search.stdout  # MLflow's per-run links would break the trials table

    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(name)
    assert exp is not None, f"no experiment {name!r} on the server"
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("coun_tune.role") == "search"]
    assert len(parents) == 1, f"expected one parent run, got {len(parents)}"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert "hypervolume" in parent.data.metrics
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"trials.parquet", "pareto.png"} <= parent_files, parent_files

    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    children = [r for r in nested if r.data.tags.get("coun_tune.role") == "trial"]
    # the review adds the original and the oracle as baseline runs under the search
    baselines = sorted(
        r.data.tags.get("coun_tune.baseline") for r in nested if r.data.tags.get("coun_tune.role") == "baseline"
    )
    assert baselines == ["oracle", "original"]
    assert len(runs) == 1 + NUM_SAMPLES + 2, "runs that are neither the parent nor its children"
    assert len(children) == NUM_SAMPLES
    trial_ids = [c.data.tags.get("coun_tune.trial_id") for c in children]
    assert all(trial_ids) and len(set(trial_ids)) == NUM_SAMPLES, f"one child per trial expected: {trial_ids}"

    for c in children:
        rid = c.info.run_id
        assert c.info.status == "FINISHED", (rid, c.info.status)
        assert c.data.tags.get("coun_tune.role") == "trial"
        for p in SEARCHED:
            assert p in c.data.params, (rid, p, c.data.params)
            float(c.data.params[p])
        for m in ("forget_gap", "retain_acc", "forget_acc", "test_acc", "avg_gap", "mia_efficacy"):
            assert m in c.data.metrics, (rid, m, sorted(c.data.metrics))
        # epochs=1: one point per metric series, at step (epoch) 1
        assert [h.step for h in client.get_metric_history(rid, "retain_acc")] == [1]
        model_files = {f.path for f in client.list_artifacts(rid, "model")}
        assert {"model/model.pt", "model/config.yaml", "model/metrics.json"} <= model_files, model_files
        assert c.data.tags.get("pareto") in ("true", "false"), (rid, c.data.tags.get("pareto"))

    # artifacts went through the server's proxy into --artifacts-destination: each trial's
    # model/ files under its run, and its MLflow logged model under models/
    stored = list(mlflow_server["artifacts"].rglob("model.pt"))
    in_runs = sorted(p.relative_to(mlflow_server["artifacts"]).parts[1] for p in stored if "models" not in p.parts)
    assert in_runs == sorted(c.info.run_id for c in children), stored
    assert len(stored) - len(in_runs) == NUM_SAMPLES, stored

    # pareto tags == the brute-force non-dominated set of the final metrics
    points = {c.info.run_id: {m: c.data.metrics[m] for m in OBJECTIVES} for c in children}
    expected = brute_force_front(points, OBJECTIVES)
    tagged = {c.info.run_id for c in children if c.data.tags["pareto"] == "true"}
    assert tagged == expected, {"tagged": tagged, "brute_force": expected, "points": points}
    assert parent.data.metrics.get("pareto_size") == len(expected)

    # export the knee, then apply it with `coun-tune unlearn`
    exported = tmp_path / "x.yaml"
    run_cli(
        ["export", name, "--pick", "knee", "--tracking-uri", url, "--output", str(exported)], cwd=tmp_path, timeout=120
    )
    text = exported.read_text()
    match = re.search(r"MLflow run ([0-9a-f]{32})", text)
    assert match, text[:500]
    picked = next((c for c in children if c.info.run_id == match.group(1)), None)
    assert picked is not None, f"exported run {match.group(1)} is not a child of the search"
    assert picked.info.run_id in expected, "the knee must be on the Pareto front"
    # the registry and the logged models agree: the server tags the registered model itself (a
    # numeric version); registering through it must not add a second entry. Each trial's model
    # is named by its trial and carries its final metrics (sent through the REST API).
    from coun_tune.tracking.models import logged_model_of

    knee_model = logged_model_of(client, picked.info.run_id)
    assert json.loads(knee_model.tags["mlflow.modelVersions"]) == [{"name": name, "version": 1}]
    for c in children:
        model = logged_model_of(client, c.info.run_id)
        assert model.name == f"trial_{c.data.tags['coun_tune.trial_number']}"
        final = {m.key: m.value for m in model.metrics}
        assert (
            final["retain_acc"] == c.data.metrics["retain_acc"] and final["forget_gap"] == c.data.metrics["forget_gap"]
        )
    assert "| trial " in client.get_model_version(name, "1").description
    cfg = yaml.safe_load(text)
    assert cfg["method"] == "coun"
    for p in SEARCHED:
        assert cfg["hparams"][p] == pytest.approx(float(picked.data.params[p]), rel=1e-9)

    out_dir = tmp_path / "d"
    run_cli(
        ["unlearn", "--config", str(exported), "--output", str(out_dir), "--cache-dir", str(cache)],
        cwd=tmp_path,
        env=child_env(OMP_NUM_THREADS="1"),
        timeout=240,
    )
    result = json.loads((out_dir / "metrics.json").read_text())
    assert result["base_models_from_cache"] == {"original": True, "oracle": True}, (
        "unlearn should reuse the base models the search trained into the same cache"
    )
    diffs = {m: result["unlearned"][m] - picked.data.metrics[m] for m in ("retain_acc", "forget_acc", "test_acc")}
    assert all(abs(d) <= 1.5 for d in diffs.values()), (diffs, result["unlearned"], picked.data.metrics)
    print(f"search {search_s:.0f} s, total {time.monotonic() - t0:.0f} s; unlearn - trial: {diffs}")
