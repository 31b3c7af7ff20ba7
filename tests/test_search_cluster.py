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
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from _search_helpers import (
    OBJECTIVES,
    SEARCHED,
    SPACE,
    child_env,
    cmdline,
    free_port,
    free_ports,
    pids_with_arg,
    run_cli,
    session_pids,
    stop_until_gone,
    write_spec,
)

from coun_tune.core.recipes import Scenario
from coun_tune.search.plan import SEARCH_STATE
from coun_tune.search.progress import TEST_SIGINT_ENV

NUM_SAMPLES = 4
NODE_MEMORY = 2 * 1024**3  # each `ray start` would otherwise claim the machine's memory
NODE_OBJECT_STORE = 100 * 1024**2

pytest_plugins = ["_s3_helpers"]  # the moto server fixtures: s3_server, s3_env


def _ray_exe() -> str:
    exe = Path(sys.executable).with_name("ray")
    assert exe.is_file(), f"no `ray` next to {sys.executable}"
    return str(exe)


def _ray_start(args: list[str], env: dict, sessions: list[int], timeout: float = 120, cwd: Path | None = None) -> str:
    proc = subprocess.Popen(
        [_ray_exe(), "start", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
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


# The nodes declare a GPU they lack (--num-gpus 1 on a CPU box): let their workers train on the
# CPU instead of failing with pick_device's "sees no CUDA" line (tests/test_i17_resources.py
# checks that line with the opt-out off).
FAKE_GPU_OK = {"COUN_TUNE_ALLOW_FAKE_GPU": "1"}


@contextmanager
def ray_cluster(base: Path, node_envs: dict[str, dict], node_cwds: dict[str, Path] | None = None):
    """A head node and a worker node (`ray start`, one CPU and one fake GPU each), each started
    with its own environment (and working directory); yields {"address", "nodes": name -> temp
    dir}. node_envs must name "head" and "worker". Everything started is stopped by PID."""
    # Short temp dirs: Ray puts Unix sockets under them (108-byte path limit).
    head_tmp, worker_tmp = base / "h", base / "w"
    gcs, agent_h, agent_w, metrics_h, metrics_w, client = free_ports(6)
    common = [
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "1",
        "--num-gpus",
        "1",
        "--memory",
        str(NODE_MEMORY),
        "--object-store-memory",
        str(NODE_OBJECT_STORE),
        "--disable-usage-stats",
    ]
    cwds = node_cwds or {}
    sessions: list[int] = []
    try:
        _ray_start(
            [
                "--head",
                "--port",
                str(gcs),
                "--ray-client-server-port",  # not the default 10001: other tests' clusters may run at once
                str(client),
                "--include-dashboard=false",
                "--dashboard-agent-listen-port",
                str(agent_h),
                "--metrics-export-port",
                str(metrics_h),
                "--temp-dir",
                str(head_tmp),
                *common,
            ],
            {**node_envs["head"], **FAKE_GPU_OK},
            sessions,
            cwd=cwds.get("head"),
        )
        _ray_start(
            [
                "--address",
                f"127.0.0.1:{gcs}",
                "--dashboard-agent-listen-port",
                str(agent_w),
                "--metrics-export-port",
                str(metrics_w),
                "--temp-dir",
                str(worker_tmp),
                *common,
            ],
            {**node_envs["worker"], **FAKE_GPU_OK},
            sessions,
            cwd=cwds.get("worker"),
        )
        for d in (head_tmp, worker_tmp):
            assert _raylet_running(d), f"no raylet running with temp dir {d}"
        yield {"address": f"127.0.0.1:{gcs}", "nodes": {"head": head_tmp, "worker": worker_tmp}}
    finally:
        # The agents rename their command line (ray::DashboardAgent), hence the sessions too.
        # gcs_server and the autoscaler monitor may sit out a SIGTERM for 30 s and more: a
        # short grace, then SIGKILL (what `ray stop` does after its grace period).
        left = stop_until_gone(lambda: _our_pids(base, sessions), grace=8)
        assert not left, f"Ray processes of this test still running: {left}"


@pytest.fixture
def two_node_cluster():
    base = Path(tempfile.mkdtemp(prefix="ctr-", dir="/tmp"))
    env = child_env(RAY_AUTH_MODE="token")
    try:
        with ray_cluster(base, {"head": env, "worker": env}) as cluster:
            yield {**cluster, "env": env}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _our_pids(base: Path, sessions: list[int]) -> list[int]:
    pids = set(pids_with_arg(str(base)))
    for sid in sessions:
        pids |= set(session_pids(sid))
    return sorted(pids)


def _trial_runs(runs: list, parent_id: str) -> list:
    """The parent's trial runs; fails unless every run of the experiment is the parent, one of
    them, or one of the two baseline runs (original, oracle) the review adds once."""
    trials = [
        r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent_id and r.data.tags.get("coun_tune.role") == "trial"
    ]
    baselines = sorted(
        r.data.tags.get("coun_tune.baseline", "") for r in runs if r.data.tags.get("coun_tune.role") == "baseline"
    )
    assert baselines == ["oracle", "original"], baselines
    assert len(runs) == 1 + len(trials) + len(baselines)
    return trials


def _node_of_pid(pid: int, nodes: dict[str, Path]) -> str | None:
    found = [name for name, tmp in nodes.items() if any(tmp.glob(f"session_*/logs/python-core-worker-*_{pid}.log"))]
    return found[0] if len(found) == 1 else None


@pytest.mark.slow
def test_search_spreads_over_two_ray_nodes(two_node_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    name = "cluster_search"
    db = tmp_path / "mlflow.db"
    storage = tmp_path / "results"
    spec = write_spec(
        tmp_path / "spec.yaml",
        name,
        cache_dir=tmp_path / "cache",
        storage_path=storage,
        tracking_uri=f"sqlite:///{db}",
        num_samples=NUM_SAMPLES,
        max_concurrent_trials=2,
        # each node declares one (fake) GPU: trials ask for half of one, as the
        # CIFAR specs do; inside a trial torch sees no CUDA and trains on the CPU
        resources_per_trial={"cpu": 1, "gpu": 0.5},
        # the front re-run on two unseen forget sets after the trials: Ray tasks on the nodes
        holdout={"split_seeds": [5, 6]},
    )
    t0 = time.monotonic()
    run_cli(
        ["search", str(spec), "--address", two_node_cluster["address"]],
        cwd=tmp_path,
        env=two_node_cluster["env"],
        timeout=600,
    )  # minutes when the cores are shared
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
    children = _trial_runs(runs, parents[0].info.run_id)
    assert len(children) == NUM_SAMPLES
    assert {c.data.tags.get("coun_tune.trial_id") for c in children} == set(results)
    for c in children:
        assert c.info.status == "FINISHED"
        assert all(p in c.data.params for p in SEARCHED)
        assert all(m in c.data.metrics for m in OBJECTIVES)
        assert c.data.tags.get("pareto") in ("true", "false")
        assert "model/model.pt" in {f.path for f in client.list_artifacts(c.info.run_id, "model")}
    assert parents[0].info.status == "FINISHED"
    # the hold-out runs are Ray tasks with the trial's resources (on a real cluster: the GPU
    # workers, never the driver): every run placed on a node, the worker node among them
    import pyarrow.parquet as pq

    held = pq.read_table(client.download_artifacts(parents[0].info.run_id, "holdout.parquet", str(tmp_path)))
    held = [r for r in held.to_pylist() if r["key"] != "original"]
    assert held and {r["split_seed"] for r in held} == {5, 6}
    held_nodes = [_node_of_pid(int(r["pid"]), two_node_cluster["nodes"]) for r in held]
    assert None not in held_nodes and "worker" in held_nodes, held_nodes
    print(f"search on 2 nodes: {search_s:.0f} s; trial -> node: {nodes}; hold-out runs -> {held_nodes}")


# --- the same on S3: nothing shared between the nodes but the bucket ----------------------------

S3_SAMPLES = 3
BUCKET = "coun-tune-test"
EPOCH_LINE = re.compile(
    r"^(original|oracle): epoch (\d+)/(\d+)  loss \d+\.\d{4}  train_acc \d+\.\d\d%  "
    r"\d+\.\d s/epoch  ETA \S+$",
    re.M,
)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def mlflow_server_on_s3(root: Path, aws: dict, artifacts: str):
    """`mlflow server` (SQLite backend, proxied artifacts to `artifacts` = s3://...) on 127.0.0.1;
    its boto3 talks to the moto server through MLFLOW_S3_ENDPOINT_URL. Stopped by PID."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "mlflow_server.log"
    env = child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **aws)
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
                artifacts,
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
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not healthy (exit {proc.poll()}):\n{log_path.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        stop_until_gone(lambda: session_pids(proc.pid), grace=5)


def _bucket(endpoint: str):
    """An S3 client of this test's own (pyarrow, not coun_tune.core.storage)."""
    from pyarrow import fs

    return fs.S3FileSystem(
        endpoint_override=endpoint.split("://", 1)[1],
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        allow_bucket_creation=True,
    )


def _local_files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) if d.exists() else []


@pytest.mark.slow
def test_search_on_s3_across_two_nodes_with_nothing_shared(s3_server, tmp_path):
    """Two Ray nodes, each with its OWN cache dir, working dir and TMPDIR (and no endpoint in
    their environment: only credentials, as an instance profile would give), the driver with a
    third; storage_path and cache_dir on s3://, the endpoint in the spec, MLflow artifacts on
    s3:// behind a real `mlflow server`. The search is interrupted (a deterministic late Ctrl-C),
    then resumed from the bucket, and must end with every trial once in MLflow and its model
    in the bucket, and nothing written to any node's local dirs."""
    endpoint, aws = s3_server["endpoint"], s3_server["env"]
    s3 = _bucket(endpoint)
    s3.create_dir(BUCKET)
    creds = {k: v for k, v in aws.items() if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    base = Path(tempfile.mkdtemp(prefix="cts-", dir="/tmp"))
    local = {
        n: {"cache": base / n / "cache", "cwd": base / n / "cwd", "tmp": base / n / "tmp"}
        for n in ("head", "worker", "driver")
    }
    for dirs in local.values():
        for d in dirs.values():
            d.mkdir(parents=True)
    node_env = {
        n: child_env(
            RAY_AUTH_MODE="token", COUN_TUNE_CACHE=str(local[n]["cache"]), TMPDIR=str(local[n]["tmp"]), **creds
        )
        for n in local
    }
    for env in node_env.values():
        for k in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
            env.pop(k, None)
    name = "s3_search"
    t0 = time.monotonic()
    try:
        _s3_search_checks(s3, base, local, node_env, endpoint, aws, tmp_path, name, t0)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _s3_search_checks(s3, base, local, node_env, endpoint, aws, tmp_path, name, t0):
    from mlflow.tracking import MlflowClient

    with (
        mlflow_server_on_s3(tmp_path, aws, f"s3://{BUCKET}/mlflow") as tracking,
        ray_cluster(
            base,
            {"head": node_env["head"], "worker": node_env["worker"]},
            {"head": local["head"]["cwd"], "worker": local["worker"]["cwd"]},
        ) as cluster,
    ):
        spec = write_spec(
            local["driver"]["cwd"] / "spec.yaml",
            name,
            cache_dir=f"s3://{BUCKET}/cache",
            storage_path=f"s3://{BUCKET}/results",
            tracking_uri=tracking,
            num_samples=S3_SAMPLES,
            max_concurrent_trials=2,
            sampler="random",
            space={**SPACE, "epochs": 2},
            storage_endpoint=endpoint,
        )
        args = ["search", str(spec), "--address", cluster["address"]]
        first = run_cli(
            args,
            cwd=local["driver"]["cwd"],
            env={**node_env["driver"], TEST_SIGINT_ENV: "1"},
            timeout=420,
            expect_rc=130,
        )
        keys = _objects(s3, f"{BUCKET}/results")
        (state_key,) = [k for k in keys if k.endswith(f"/{SEARCH_STATE}")]
        assert json.loads(_read(s3, state_key))["status"] == "interrupted"
        assert not any(k.endswith("/exported_knee.yaml") for k in keys)
        resumed = run_cli(args + ["--resume"], cwd=local["driver"]["cwd"], env=node_env["driver"], timeout=420)
        search_s = time.monotonic() - t0

        # trials ran on both nodes: result.json (now in the bucket) holds the worker's pid
        results = {}
        exp_prefix = state_key.rsplit("/", 1)[0]
        for k in _objects(s3, f"{BUCKET}/{exp_prefix}"):
            if k.endswith("/result.json"):
                last = json.loads(_read(s3, k).strip().splitlines()[-1])
                results[last["trial_id"]] = last
        assert len(results) == S3_SAMPLES, sorted(results)
        nodes = {tid: _node_of_pid(r["pid"], cluster["nodes"]) for tid, r in results.items()}
        assert set(nodes.values()) == {"head", "worker"}, f"trials did not spread over both nodes: {nodes}"
        client = MlflowClient(tracking_uri=tracking)
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id], max_results=100)

        # base-model training streamed one line per epoch from the Ray task, for both roles
        epochs = {
            role: [(int(k), int(n)) for r, k, n in EPOCH_LINE.findall(first.stdout) if r == role]
            for role in ("original", "oracle")
        }
        n_epochs = Scenario(dataset="digits", forget="random:0.1", seed=0, recipe="tiny").train_recipe.epochs
        assert epochs["original"] == epochs["oracle"] == [(k, n_epochs) for k in range(1, n_epochs + 1)], first.stdout
        assert "trained now" in first.stdout and "from the cache" in resumed.stdout

        # every trial exactly once in MLflow, finished, its model in the bucket
        parents = [r for r in runs if r.data.tags.get("coun_tune.role") == "search"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        children = _trial_runs(runs, parents[0].info.run_id)
        assert len(children) == S3_SAMPLES
        assert {c.data.tags.get("coun_tune.trial_id") for c in children} == set(results)
        bucket_keys = _objects(s3, f"{BUCKET}/mlflow")
        for c in children:
            assert c.info.status == "FINISHED", c.data.tags
            steps = sorted(m.step for m in client.get_metric_history(c.info.run_id, "retain_acc"))
            assert steps == [1, 2]  # the interrupted trial went on from its checkpoint: no epoch twice
            assert _model_keys(client, exp.experiment_id, c.info.run_id, bucket_keys), c.info.run_id
        assert sum(1 for c in children if c.data.tags.get("status") == "completed") == S3_SAMPLES

        # the search's files are in the bucket and on no machine's disk
        keys = _objects(s3, BUCKET)
        assert any(k.startswith("cache/splits/digits/") and k.endswith(".parquet") for k in keys)
        models = sorted(k for k in keys if k.startswith("cache/models/"))
        assert len(models) == 4 and sum(k.endswith("/model.pt") for k in models) == 2, models
        assert f"{exp_prefix}/exported_knee.yaml" in keys
        assert json.loads(_read(s3, state_key))["status"] == "finished"
        for n, dirs in local.items():
            for kind in ("cache", "cwd"):
                left = [f for f in _local_files(dirs[kind]) if f != "spec.yaml"]
                # the one driver-local file: the Optuna study's journal (with s3:// storage and an
                # MLflow server it lives in the head's cache dir, as the search prints); models,
                # splits and results go through the bucket only
                expected = ["optuna/optuna.journal"] if (n, kind) == ("driver", "cache") else []
                assert left == expected, f"{n}'s local {kind} dir got files: {left}"
        print(
            f"S3 search on 2 nodes (interrupted + resumed, incl. mlflow server and cluster start): {search_s:.0f} s; "
            f"trial -> node: {nodes}"
        )


def _model_keys(client, experiment_id: str, run_id: str, bucket_keys: list[str]) -> list[str]:
    """The bucket keys of a run's model.pt: under the run's artifacts (`model/model.pt`) or, for
    an MLflow 3 logged model of the run, under `models/<model_id>/`."""
    model_ids = [m.model_id for m in client.search_logged_models([experiment_id]) if m.source_run_id == run_id]
    return [
        k
        for k in bucket_keys
        if k.endswith("/model.pt") and (f"/{run_id}/artifacts/" in k or any(f"/models/{i}/" in k for i in model_ids))
    ]


def _objects(s3, prefix: str) -> list[str]:
    from pyarrow import fs

    infos = s3.get_file_info(fs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path.split("/", 1)[1] for i in infos if i.type == fs.FileType.File)


def _read(s3, key: str) -> str:
    with s3.open_input_stream(key if key.startswith(f"{BUCKET}/") else f"{BUCKET}/{key}") as f:
        return f.read().decode()
