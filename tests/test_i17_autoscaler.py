"""Issue 17, point 3, the autoscaler's side: node types checked against Ray's real autoscaler.

One loopback cluster per module: a head of 1 CPU and no GPU, started with
`ray start --head --autoscaling-config=...` and autoscaler v2 (`RAY_enable_autoscaler_v2=1`)
driving Ray's fake multi-node provider (`ray.autoscaler._private.fake_multi_node`: the provider
Ray's own autoscaler tests use; its "nodes" are raylets started on this machine by the
autoscaler). The config has a worker type `gpu_worker` {CPU: 2, GPU: 1 (fake)} with
max_workers 3 and a cluster-wide max_workers of 2; no worker is up at the start.

- The driver, connected to the head, reads the node types from the running autoscaler's
  `--autoscaling-config` (no $COUN_TUNE_CLUSTER_CONFIG, no ~/ray_bootstrap_config.yaml; Ray 2.60
  writes no cluster config to the GCS, v2 included: if a later Ray does, the types must come
  from there and match). A {cpu: 1, gpu: 0.25} trial fits although no live node has a GPU, and
  the warning counts 2 trials per gpu_worker x 2 nodes (the cluster-wide cap, not 3).
- `coun-tune search` of such a spec runs its trial: the autoscaler launched a gpu_worker node
  for it (the trial, given a fake GPU without CUDA, trains on the CPU: COUN_TUNE_ALLOW_FAKE_GPU=1).
- `gpu: 2` fits on no node type: exit 2 within seconds, one line naming the node types,
  nothing written.

Why the provider is `type: external` with the fake provider's class as `module`: the v2
autoscaler fills the config's defaults from the provider's default file, and Ray's wheel does not
ship `fake_multi_node/example.yaml` (FileNotFoundError in monitor.err, no node ever launched);
an external provider's defaults are built in. COUN_TUNE_TEST_AUTOSCALER=v1 runs the file against
the classic (v1) autoscaler instead (Ray's default; the provider as `type: fake_multinode`).

Never `ray stop`: everything the head started (the fake nodes too: the autoscaler starts them)
is in the head's session and under its temp dir, stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _i17_cluster import NODE_MEMORY, NODE_OBJECT_STORE, ray_exe
from _search_helpers import child_env, free_ports, pids_with_arg, run_cli, session_pids, stop_until_gone, write_spec

from coun_tune.errors import UsageError
from coun_tune.search import resources
from coun_tune.search.resources import NodeType, capacity, check_cluster, trial_request

# which autoscaler runs the fake provider: v2 (here by default), or v1 (Ray's default) with COUN_TUNE_TEST_AUTOSCALER=v1
AUTOSCALER = os.environ.get("COUN_TUNE_TEST_AUTOSCALER", "v2")
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # the fake provider's id for the head (its workers: ...00001, ...)
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider"
GPU_TYPE = "gpu_worker"
HEAD_TYPE = "ray.head.default"  # the fake provider names the head's type so
GPU_NODE = {"CPU": 2, "GPU": 1, "object_store_memory": NODE_OBJECT_STORE}
TYPE_MAX, CLUSTER_MAX = 3, 2  # the cluster-wide cap binds: at most 2 gpu_worker nodes
ASK = {"cpu": 1, "gpu": 0.25}  # 2 per gpu_worker (its CPUs bind), none on the head


def cluster_config(gcs_port: int) -> dict:
    return {
        "cluster_name": "coun-tune-fake",
        "max_workers": CLUSTER_MAX,
        "provider": {
            **(
                {"type": "fake_multinode"}
                if AUTOSCALER == "v1"
                else {"type": "external", "module": f"{FAKE_PROVIDER}.FakeMultiNodeProvider"}
            ),
            "gcs_address": f"127.0.0.1:{gcs_port}",  # where the fake nodes join (default :6379)
            "head_node_id": FAKE_HEAD_NODE_ID,
            "launch_multiple": True,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            GPU_TYPE: {"resources": dict(GPU_NODE), "node_config": {}, "min_workers": 0, "max_workers": TYPE_MAX},
        },
        "head_node_type": HEAD_TYPE,
        "idle_timeout_minutes": 30,  # the launched node stays until teardown
        "upscaling_speed": 1.0,
        # the rest is required by the config's validation (the monitor dies without it)
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{k: [] for k in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
    }


class AutoscalingHead:
    """`ray start --head --autoscaling-config=...` with the fake provider, in its own session."""

    def __init__(self, base: Path):
        self.base = base
        self.config = base / "cluster.yaml"
        self.sid: int | None = None
        self.address: str | None = None
        self.temp_dir: Path | None = None

    def start(self, env: dict, timeout: float = 420, tries: int = 3) -> None:
        for attempt in range(tries):  # on a loaded machine a raylet can die at start: try again
            try:
                return self._start(env, timeout, attempt)
            except AssertionError:
                if attempt == tries - 1:
                    raise
                self.close()

    def _start(self, env: dict, timeout: float, attempt: int) -> None:
        gcs, client, agent, metrics = free_ports(4)
        self.config.write_text(json.dumps(cluster_config(gcs), indent=1))
        temp_dir = self.temp_dir = self.base / f"t{attempt}"  # short: Ray's Unix sockets live under it
        args = [
            "start",
            "--head",
            f"--autoscaling-config={self.config}",
            "--port",
            str(gcs),
            "--ray-client-server-port",
            str(client),
            "--include-dashboard=false",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "1",
            "--num-gpus",
            "0",
            "--memory",
            str(NODE_MEMORY),
            "--object-store-memory",
            str(NODE_OBJECT_STORE),
            "--disable-usage-stats",
            "--dashboard-agent-listen-port",
            str(agent),
            "--metrics-export-port",
            str(metrics),
            "--temp-dir",
            str(temp_dir),
        ]
        proc = subprocess.Popen(
            [ray_exe(), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.sid = proc.pid  # the daemons (and the nodes the autoscaler starts) keep this session
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError(f"`ray start --head` ran over {timeout} s:\n{out[-3000:]}") from None
        assert proc.returncode == 0, f"`ray start --head` exited {proc.returncode}:\n{out[-2000:]}"
        self.address = f"127.0.0.1:{gcs}"
        self.wait_for_autoscaler(timeout)

    def wait_for_autoscaler(self, timeout: float) -> None:
        """Until the autoscaler has taken the head into its instances (it read the config and
        runs); a monitor that died on its config fails here, with its traceback (monitor.err;
        monitor.log's tracebacks are logged and survived, e.g. its metrics port taken)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            err = "".join(f.read_text(errors="replace") for f in self.temp_dir.glob("session_2*/logs/monitor.err"))
            assert "Traceback" not in err, f"the autoscaler died:\n{self.monitor_log()}"
            running = f"type={HEAD_TYPE}" if AUTOSCALER == "v2" else f" 1 {HEAD_TYPE}"  # (v1: its status report)
            if running in self.monitor_log(tail=None):
                return
            time.sleep(1)
        raise AssertionError(f"the autoscaler did not start in {timeout} s:\n{self.monitor_log()}")

    def monitor_log(self, tail: int | None = 2000) -> str:
        """The autoscaler's logs (monitor.log/.out/.err), each cut to its last `tail` characters."""
        logs = sorted(self.temp_dir.glob("session_2*/logs/monitor.*")) if self.temp_dir else []
        return "\n".join(f"--- {f}\n{f.read_text(errors='replace')[-(tail or 0) :]}" for f in logs if f.stat().st_size)

    def pids(self) -> list[int]:
        return sorted(set(pids_with_arg(str(self.base))) | set(session_pids(self.sid) if self.sid else []))

    def close(self) -> None:
        left = stop_until_gone(self.pids, grace=3)  # gcs_server and the monitor may sit out a SIGTERM
        assert not left, f"Ray processes of this test still running: {left}"


@pytest.fixture(scope="module")
def autoscaling():
    """The cluster. env: for a driver (`coun-tune`, PROBE); the head's own variables stay with it."""
    base = Path(tempfile.mkdtemp(prefix="ra-", dir="/tmp"))
    head_env = child_env(
        RAY_AUTH_MODE="token",
        RAY_FAKE_CLUSTER="1",  # the fake provider refuses to run without it
        RAY_enable_autoscaler_v2="1" if AUTOSCALER == "v2" else "0",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        COUN_TUNE_ALLOW_FAKE_GPU="1",  # inherited by the nodes the autoscaler starts, and their workers
        RAY_raylet_start_wait_time_s="300",
        RAY_agent_register_timeout_ms="300000",
    )
    if AUTOSCALER == "v2":  # v2 matches the head's instance by these (as Ray's AutoscalingCluster does)
        head_env.update(RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID, RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID)
    head_env.pop(resources.CLUSTER_CONFIG_ENV, None)
    driver_env = child_env(RAY_AUTH_MODE="token", COUN_TUNE_ALLOW_FAKE_GPU="1")
    driver_env.pop(resources.CLUSTER_CONFIG_ENV, None)
    head = AutoscalingHead(base)
    try:
        head.start(head_env)
        yield {"head": head, "env": driver_env}
    finally:
        head.close()
        shutil.rmtree(base, ignore_errors=True)


# A driver on the head (Ray reads RAY_AUTH_MODE once per process: not this one). argv: address,
# a path standing for ~/ray_bootstrap_config.yaml, then JSON [[resources_per_trial,
# max_concurrent_trials], ...] to run check_cluster on.
PROBE = r"""
import io, json, sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
from coun_tune.search import resources
resources.BOOTSTRAP_CONFIG = sys.argv[2]
types, source = resources.autoscaler_types()
out = {"gcs": resources._types_from_gcs() is not None, "source": source, "live": resources.live_nodes(),
       "types": [[t.name, t.resources, t.max_count, t.cluster_max] for t in types or []],
       "nodes": [[n["NodeID"], n["Alive"], n["Resources"]] for n in ray.nodes()], "checks": []}
for ask, most in json.loads(sys.argv[3]):
    buf = io.StringIO()
    try:
        cap = resources.check_cluster(ask, most, out=buf)
        out["checks"].append({"reachable": cap.reachable, "out": buf.getvalue(), "error": None})
    except Exception as e:
        out["checks"].append({"reachable": None, "out": buf.getvalue(), "error": f"{type(e).__name__}: {e}"})
print("PROBE " + json.dumps(out))
"""


def probe(autoscaling: dict, tmp_path: Path, checks: list | None = None) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE,
            autoscaling["head"].address,
            str(tmp_path / "absent.yaml"),
            json.dumps(checks or []),
        ],
        env=autoscaling["env"],
        capture_output=True,
        text=True,
        timeout=240,
        start_new_session=True,
    )
    found = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert found, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(found[0][len("PROBE ") :])


def _spec(tmp_path: Path, cache_dir: Path, **extra) -> Path:
    return write_spec(
        tmp_path / "spec.yaml",
        "auto",
        cache_dir=cache_dir,
        storage_path=tmp_path / "results",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        **extra,
    )


def _expected_source(head: AutoscalingHead, gcs: bool) -> str:
    if gcs:  # a later Ray that reports its cluster config to the GCS
        return "the autoscaler's cluster config (GCS)"
    return f"{head.config}, the running autoscaler's --autoscaling-config"


# --- arithmetic, no cluster -------------------------------------------------------------------------


def test_worker_types_share_the_clusters_max_workers():
    ask = trial_request(ASK)
    head = NodeType(HEAD_TYPE, {"CPU": 1}, 1)
    big = NodeType("big", {"CPU": 8, "GPU": 1}, 4, 5)  # 4 trials each (4 x 0.25 GPU)
    small = NodeType("small", {"CPU": 2, "GPU": 1}, 4, 5)  # 2 each (CPU binds)
    # 5 workers in all: 4 big + 1 small, whatever order the config lists them in
    assert capacity(ask, [{"CPU": 1}], [head, small, big]).reachable == 4 * 4 + 1 * 2
    assert capacity(ask, [{"CPU": 1}], [head, NodeType("small", small.resources, 4)]).reachable == 8
    assert capacity(ask, [], [head, NodeType("big", big.resources, -1, 5)]).reachable == 5 * 4
    assert capacity(ask, [], [head, NodeType("big", big.resources, -1)]).reachable == sys.maxsize


def test_without_visible_node_types_the_failure_says_how_to_name_them(monkeypatch):
    monkeypatch.setattr(resources, "live_nodes", lambda: [{"CPU": 1.0}])
    monkeypatch.setattr(resources, "autoscaler_types", lambda: (None, "no autoscaler config visible from this driver"))
    with pytest.raises(UsageError) as e:
        check_cluster(ASK, 1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("resources_per_trial {cpu: 1, gpu: 0.25} fits on no node"), msg
    assert "no autoscaler config visible from this driver" in msg and f"${resources.CLUSTER_CONFIG_ENV}" in msg


# --- against the real autoscaler --------------------------------------------------------------------


@pytest.mark.slow
def test_the_driver_reads_the_running_autoscalers_node_types(autoscaling, tmp_path):
    head = autoscaling["head"]
    ask = trial_request(ASK)
    nodes_reach = 2 * CLUSTER_MAX  # 2 trials per gpu_worker x 2 nodes (the cluster's max_workers, not TYPE_MAX)
    seen = probe(autoscaling, tmp_path, [[ASK, nodes_reach], [ASK, nodes_reach + 1], [{"cpu": 1, "gpu": 2}, 1]])
    assert seen["types"], f"no node types seen ({seen['source']})\n{head.monitor_log()}"
    source = seen["source"]
    assert source == _expected_source(head, seen["gcs"])  # no $COUN_TUNE_CLUSTER_CONFIG, no ~/ray_bootstrap_config.yaml
    types = [NodeType(*t) for t in seen["types"]]
    assert {t.name: (t.resources.get("CPU"), t.resources.get("GPU", 0.0)) for t in types} == {
        HEAD_TYPE: (1.0, 0.0),
        GPU_TYPE: (2.0, 1.0),
    }
    without_gpu = [n for n in seen["live"] if not n.get("GPU")]  # the head (a gpu_worker may be up already)
    assert without_gpu and not capacity(ask, without_gpu, None).fits_somewhere  # the live nodes alone: never
    cap = capacity(ask, without_gpu, types)
    assert cap.fits_somewhere and cap.per_type == {HEAD_TYPE: 0, GPU_TYPE: 2}
    if not seen["gcs"]:
        assert {t.name: (t.max_count, t.cluster_max) for t in types} == {
            HEAD_TYPE: (1, None),
            GPU_TYPE: (CLUSTER_MAX, CLUSTER_MAX),
        }
        assert cap.reachable == nodes_reach
    fits, warns, fails = seen["checks"]
    assert fits == {"reachable": nodes_reach, "out": "", "error": None}
    assert warns["error"] is None and warns["out"].splitlines() == [
        f"warning: at most {nodes_reach} trial(s) of {{cpu: 1, gpu: 0.25}} fit at once on the nodes and node types "
        f"({source}), below max_concurrent_trials {nodes_reach + 1}; the search runs {nodes_reach} at a time"
    ]
    assert fails["error"].startswith("UsageError: resources_per_trial {cpu: 1, gpu: 2} fits on no node"), fails
    assert GPU_TYPE in fails["error"] and HEAD_TYPE in fails["error"]


@pytest.mark.slow
def test_a_trial_no_node_type_holds_fails_in_seconds_naming_the_types(autoscaling, tmp_path):
    head = autoscaling["head"]
    spec = _spec(tmp_path, tmp_path / "cache", resources_per_trial={"cpu": 1, "gpu": 2})
    t0 = time.monotonic()
    proc = run_cli(
        ["search", str(spec), "--address", head.address],
        cwd=tmp_path,
        env=autoscaling["env"],
        expect_rc=2,
        timeout=240,
    )
    wall = time.monotonic() - t0
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("coun-tune: error: resources_per_trial {cpu: 1, gpu: 2} fits on no node of this Ray"), line
    sources = [_expected_source(head, gcs) for gcs in (False, True)]  # Ray 2.60: the first (see the test above)
    assert any(f"; autoscaler node types from {src}: " in line for src in sources), line
    assert f"{HEAD_TYPE} {{CPU: 1, GPU: 0}} (at most 1)" in line and f"{GPU_TYPE} {{CPU: 2, GPU: 1}} (at most " in line
    assert line.endswith("lower resources_per_trial or add a node type that holds it"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"], "something was written"
    assert wall < 120, f"took {wall:.0f} s"  # the CLI's start and connection; a hang would hit the timeout
    print(f"failed after {wall:.1f} s: {line}")


@pytest.mark.slow
def test_a_gpu_search_runs_on_a_node_the_autoscaler_launched(autoscaling, tmp_path, prepared, session_cache_dir):
    head = autoscaling["head"]
    spec = _spec(
        tmp_path, session_cache_dir, num_samples=1, max_concurrent_trials=1, sampler="random", resources_per_trial=ASK
    )
    proc = run_cli(["search", str(spec), "--address", head.address], cwd=tmp_path, env=autoscaling["env"], timeout=600)
    assert "1 of 1 trials completed" in proc.stdout, proc.stdout[-3000:]
    assert not [line for line in proc.stdout.splitlines() if line.startswith("warning: at most")], proc.stdout[-3000:]
    gpu_nodes = [(nid, res) for nid, _, res in probe(autoscaling, tmp_path)["nodes"] if res.get("GPU")]
    assert gpu_nodes, f"no GPU node ever joined\n{head.monitor_log()}"
    for nid, res in gpu_nodes:  # started by the fake provider (its ids), with the type's resources
        assert nid.startswith("f" * 51) and nid != FAKE_HEAD_NODE_ID, nid
        assert (res["CPU"], res["GPU"]) == (2.0, 1.0), res
    assert len(gpu_nodes) <= CLUSTER_MAX
    assert f"Adding 1 node(s) of type {GPU_TYPE}" in head.monitor_log(tail=None)  # the autoscaler's own decision
