"""A search on a real TWO-NODE Ray cluster on loopback: `ray start --head` plus a second
`ray start --address`, each with one CPU, its own --temp-dir, bounded memory and token auth;
`coun-tune search --address` (a subprocess: no Ray state in pytest) runs 4 trials of 1 CPU,
2 at a time, so they must spread over both nodes.

Which node ran a trial: Tune's `node_ip`/`hostname` are the same for both nodes on loopback,
but each node writes its workers' logs, named by PID, under its own temp dir
(`python-core-worker-<worker id>_<pid>.log`); a trial's result.json holds the `pid` of the
process that ran it. So the node is the temp dir holding that PID's worker log.

Everything this test starts is stopped by PID (the sessions of the two `ray start` commands
and anything whose command line names this test's temp dir). Never `ray stop`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from _search_helpers import (OBJECTIVES, SEARCHED, child_env, cmdline, free_ports, pids_with_arg, run_cli, session_pids,
                             stop_until_gone, write_spec)

NUM_SAMPLES = 4
NODE_MEMORY = 2 * 1024**3          # each `ray start` would otherwise claim the machine's memory
NODE_OBJECT_STORE = 100 * 1024**2


def _ray_exe() -> str:
    exe = Path(sys.executable).with_name("ray")
    assert exe.is_file(), f"no `ray` next to {sys.executable}"
    return str(exe)


def _ray_start(args: list[str], env: dict, sessions: list[int], timeout: float = 120) -> str:
    proc = subprocess.Popen([_ray_exe(), "start", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    sessions.append(proc.pid)  # its daemons keep this session id after `ray start` exits
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"`ray start {' '.join(args)}` ran over {timeout} s:\n{out[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"`ray start {' '.join(args)}` exited {proc.returncode}:\n{out[-3000:]}")
    return out


def _raylet_running(temp_dir: Path) -> bool:
    return any(cmdline(p).split(" ")[0].endswith("/raylet") for p in pids_with_arg(str(temp_dir)))


@pytest.fixture
def two_node_cluster():
    # Short temp dirs: Ray puts Unix sockets under them (108-byte path limit).
    base = Path(tempfile.mkdtemp(prefix="ctr-", dir="/tmp"))
    head_tmp, worker_tmp = base / "h", base / "w"
    gcs, agent_h, agent_w, metrics_h, metrics_w = free_ports(5)
    env = child_env(RAY_AUTH_MODE="token")
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "1", "--memory", str(NODE_MEMORY),
              "--object-store-memory", str(NODE_OBJECT_STORE), "--disable-usage-stats"]
    sessions: list[int] = []
    try:
        _ray_start(["--head", "--port", str(gcs), "--include-dashboard=false",
                    "--dashboard-agent-listen-port", str(agent_h), "--metrics-export-port", str(metrics_h),
                    "--temp-dir", str(head_tmp), *common], env, sessions)
        _ray_start(["--address", f"127.0.0.1:{gcs}", "--dashboard-agent-listen-port", str(agent_w),
                    "--metrics-export-port", str(metrics_w), "--temp-dir", str(worker_tmp), *common], env, sessions)
        for d in (head_tmp, worker_tmp):
            assert _raylet_running(d), f"no raylet running with temp dir {d}"
        yield {"address": f"127.0.0.1:{gcs}", "env": env, "nodes": {"head": head_tmp, "worker": worker_tmp}}
    finally:
        # The agents rename their command line (ray::DashboardAgent), hence the sessions too.
        # gcs_server and the autoscaler monitor may sit out a SIGTERM for 30 s and more: a
        # short grace, then SIGKILL (what `ray stop` does after its grace period).
        left = stop_until_gone(lambda: _our_pids(base, sessions), grace=8)
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"Ray processes of this test still running: {left}"


def _our_pids(base: Path, sessions: list[int]) -> list[int]:
    pids = set(pids_with_arg(str(base)))
    for sid in sessions:
        pids |= set(session_pids(sid))
    return sorted(pids)


def _node_of_pid(pid: int, nodes: dict[str, Path]) -> str | None:
    found = [name for name, tmp in nodes.items()
             if any(tmp.glob(f"session_*/logs/python-core-worker-*_{pid}.log"))]
    return found[0] if len(found) == 1 else None


@pytest.mark.slow
def test_search_spreads_over_two_ray_nodes(two_node_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    name = "cluster_search"
    db = tmp_path / "mlflow.db"
    storage = tmp_path / "results"
    spec = write_spec(tmp_path / "spec.yaml", name, cache_dir=tmp_path / "cache", storage_path=storage,
                      tracking_uri=f"sqlite:///{db}", num_samples=NUM_SAMPLES, max_concurrent_trials=2,
                      # each node declares one (fake) GPU: trials ask for half of one, as the
                      # CIFAR specs do; inside a trial torch sees no CUDA and trains on the CPU
                      resources_per_trial={"cpu": 1, "gpu": 0.5})
    t0 = time.monotonic()
    run_cli(["search", str(spec), "--address", two_node_cluster["address"]], cwd=tmp_path,
            env=two_node_cluster["env"], timeout=300)
    search_s = time.monotonic() - t0

    # where each trial ran
    results = {}
    for f in sorted(storage.glob(f"{name}_*/*/result.json")):
        last = json.loads(f.read_text().strip().splitlines()[-1])
        results[last["trial_id"]] = last
    assert len(results) == NUM_SAMPLES, sorted(results)
    nodes = {tid: _node_of_pid(r["pid"], two_node_cluster["nodes"]) for tid, r in results.items()}
    assert None not in nodes.values(), f"could not place every trial's pid on a node: {nodes}"
    assert set(nodes.values()) == {"head", "worker"}, f"trials did not spread over both nodes: {nodes}"

    # every trial in MLflow, as a child of the one search run
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("coun_tune.role") == "search"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(runs) == 1 + NUM_SAMPLES and len(children) == NUM_SAMPLES
    assert {c.data.tags.get("coun_tune.trial_id") for c in children} == set(results)
    for c in children:
        assert c.info.status == "FINISHED"
        assert all(p in c.data.params for p in SEARCHED)
        assert all(m in c.data.metrics for m in OBJECTIVES)
        assert c.data.tags.get("pareto") in ("true", "false")
        assert "model/model.pt" in {f.path for f in client.list_artifacts(c.info.run_id, "model")}
    assert parents[0].info.status == "FINISHED"
    print(f"search on 2 nodes: {search_s:.0f} s; trial -> node: {nodes}")
