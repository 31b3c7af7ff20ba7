"""Issue 17, point 3: the search says at once when the cluster cannot run what the spec asks.

- Packing arithmetic (coun_tune.search.resources): trials per node, the reachable count with
  and without the autoscaler's node types, the types read from `ray up`'s bootstrap config.
- On a loopback 2-node cluster with no GPU, a `gpu: 1` spec fails within seconds with one line
  and exit 2, nothing written (it used to hang for ever after "Connected"); a spec whose
  max_concurrent_trials the nodes cannot reach runs with one warning line.
- A Ray worker that was given a GPU but whose torch sees no CUDA fails with one line instead of
  training on the CPU: the base-model task (the search ends with that line, exit 2) and a trial
  (its error, what the MLflow `error` tag shows); COUN_TUNE_ALLOW_FAKE_GPU=1 on the worker lets
  it train on the CPU (what the loopback tests that fake GPUs set).
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
import torch
import yaml
from _i17_cluster import LoopbackCluster
from _search_helpers import child_env, run_cli, write_spec

from coun_tune.core import pipeline
from coun_tune.errors import UsageError
from coun_tune.search import resources
from coun_tune.search.resources import NodeType, capacity, check_cluster, trial_request, trials_per_node

# --- arithmetic -------------------------------------------------------------------------------------


def test_trials_per_node_packs_fractional_gpus():
    g5 = {"CPU": 4.0, "GPU": 1.0, "memory": 1e10}
    assert trials_per_node(g5, trial_request({"cpu": 1, "gpu": 0.25})) == 4
    assert trials_per_node(g5, trial_request({"cpu": 4, "gpu": 0.5})) == 1  # the old CIFAR request
    assert trials_per_node(g5, trial_request({"cpu": 1, "gpu": 0.3})) == 3
    assert trials_per_node({"CPU": 8.0}, trial_request({"cpu": 1, "gpu": 1})) == 0
    assert trials_per_node({"CPU": 8.0}, trial_request({"cpu": 2, "gpu": 0})) == 4


def test_capacity_counts_live_nodes_and_node_types():
    ask = trial_request({"cpu": 1, "gpu": 0.25})
    head = {"CPU": 2.0}
    assert not capacity(ask, [head], None).fits_somewhere
    types = [NodeType("head", {"CPU": 2}, 1), NodeType("gpu_spot", {"CPU": 4, "GPU": 1}, 4)]
    cap = capacity(ask, [head], types)  # no GPU worker up yet: the autoscaler can start 4
    assert cap.fits_somewhere and cap.reachable == 16
    assert capacity(ask, [head], [NodeType("gpu", {"CPU": 4, "GPU": 1}, -1)]).reachable == sys.maxsize
    assert capacity(ask, [head, {"CPU": 4, "GPU": 1}], None).reachable == 4


def test_node_types_are_read_from_the_bootstrap_config(tmp_path, monkeypatch):
    config = {
        "cluster_name": "x",
        "max_workers": 6,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_spot": {"resources": {"CPU": 4, "GPU": 1}, "node_config": {}, "max_workers": 4},
            "gpu_ondemand": {"resources": {"CPU": 4, "GPU": 1}, "node_config": {}, "max_workers": 8},
            "detected": {"node_config": {}, "max_workers": 2},  # resources left to launch time
        },
    }
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv(resources.CLUSTER_CONFIG_ENV, str(path))
    monkeypatch.setattr(resources, "_types_from_gcs", lambda: None)
    types, source = resources.autoscaler_types()
    assert source == str(path)
    assert {t.name: (t.resources, t.max_count) for t in types} == {
        "head": ({"CPU": 0.0}, 1),
        "gpu_spot": ({"CPU": 4.0, "GPU": 1.0}, 4),
        "gpu_ondemand": ({"CPU": 4.0, "GPU": 1.0}, 6),  # capped by the cluster's max_workers
    }


def test_check_cluster_fails_in_one_line_or_warns(monkeypatch, capsys):
    monkeypatch.setattr(resources, "live_nodes", lambda: [{"CPU": 2.0}, {"CPU": 2.0}])
    monkeypatch.setattr(resources, "autoscaler_types", lambda: (None, "none"))
    with pytest.raises(UsageError) as e:
        check_cluster({"cpu": 1, "gpu": 1}, 2)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("resources_per_trial {cpu: 1, gpu: 1} fits on no node of this Ray cluster")
    assert "2 x {CPU: 2, GPU: 0}" in str(e.value)
    check_cluster({"cpu": 1, "gpu": 0}, 4, out=sys.stdout)
    assert capsys.readouterr().out == ""
    check_cluster({"cpu": 2, "gpu": 0}, 4, out=sys.stdout)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("warning: at most 2 trial(s) of {cpu: 2} fit at once on the live nodes")


# --- the CUDA check, in-process ---------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_pick_device_refuses_the_cpu_when_ray_gave_a_gpu(monkeypatch):
    monkeypatch.delenv(pipeline.ALLOW_FAKE_GPU_ENV, raising=False)
    assert pipeline.pick_device() == torch.device("cpu")  # not in a Ray worker
    monkeypatch.setattr(pipeline, "ray_assigned_gpus", lambda: 0.5)
    with pytest.raises(UsageError, match=r"was given 0.5 GPU .* sees no CUDA device"):
        pipeline.pick_device()
    assert pipeline.pick_device("cpu") == torch.device("cpu")  # asked for explicitly
    monkeypatch.setenv(pipeline.ALLOW_FAKE_GPU_ENV, "1")
    assert pipeline.pick_device() == torch.device("cpu")


# --- loopback clusters ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_cluster():
    """Two nodes of 1 CPU each and no GPU."""
    base = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    env = child_env(RAY_AUTH_MODE="token")
    try:
        with LoopbackCluster(base) as cluster:
            cluster.add("head", cpus=1, gpus=0, env=env)
            cluster.add("w1", cpus=1, gpus=0, env=env)
            yield {"address": cluster.address, "env": env}
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def fake_gpu_cluster():
    """One node declaring a GPU this machine does not have, without the opt-out."""
    base = Path(tempfile.mkdtemp(prefix="rg-", dir="/tmp"))
    env = child_env(RAY_AUTH_MODE="token")
    env.pop(pipeline.ALLOW_FAKE_GPU_ENV, None)
    try:
        with LoopbackCluster(base) as cluster:
            cluster.add("head", cpus=1, gpus=1, env=env)
            yield {"address": cluster.address, "env": env}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _spec(tmp_path: Path, cache_dir: Path, **extra) -> Path:
    return write_spec(
        tmp_path / "spec.yaml",
        "res",
        cache_dir=cache_dir,
        storage_path=tmp_path / "results",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        **extra,
    )


@pytest.mark.slow
def test_a_gpu_spec_on_a_cluster_without_gpus_fails_in_seconds(cpu_cluster, tmp_path):
    spec = _spec(tmp_path, tmp_path / "cache", resources_per_trial={"cpu": 1, "gpu": 1})
    t0 = time.monotonic()
    proc = run_cli(
        ["search", str(spec), "--address", cpu_cluster["address"]],
        cwd=tmp_path,
        env=cpu_cluster["env"],
        expect_rc=2,
        timeout=240,  # the old code hung here for ever
    )
    wall = time.monotonic() - t0
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("coun-tune: error: resources_per_trial {cpu: 1, gpu: 1} fits on no node"), line
    assert "2 x {CPU: 1, GPU: 0}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"], "something was written"
    print(f"failed after {wall:.1f} s: {line}")


@pytest.mark.slow
def test_unreachable_concurrency_is_one_warning_line(cpu_cluster, tmp_path, prepared, session_cache_dir):
    spec = _spec(tmp_path, session_cache_dir, num_samples=1, max_concurrent_trials=3, sampler="random")
    proc = run_cli(
        ["search", str(spec), "--address", cpu_cluster["address"]], cwd=tmp_path, env=cpu_cluster["env"], timeout=600
    )
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: at most")]
    assert warnings == [
        "warning: at most 2 trial(s) of {cpu: 1} fit at once on the live nodes, below max_concurrent_trials 3; "
        "the search runs 2 at a time"
    ], proc.stdout[-3000:]
    assert "1 of 1 trials completed" in proc.stdout


@pytest.mark.slow
def test_a_gpu_worker_without_cuda_fails_the_search_in_one_line(
    fake_gpu_cluster, tmp_path, prepared, session_cache_dir
):
    """The base-model task (first to ask for the GPU) refuses to train on the CPU."""
    spec = _spec(tmp_path, session_cache_dir, resources_per_trial={"cpu": 1, "gpu": 0.5}, max_concurrent_trials=1)
    proc = run_cli(
        ["search", str(spec), "--address", fake_gpu_cluster["address"]],
        cwd=tmp_path,
        env=fake_gpu_cluster["env"],
        expect_rc=2,
        timeout=300,
    )
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("coun-tune: error: this Ray worker on ") and "was given 0.5 GPU" in line, line
    assert "sees no CUDA device" in line and pipeline.ALLOW_FAKE_GPU_ENV in line
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


TRIAL_SCRIPT = r"""
import json, sys
import ray
from ray import tune

address, storage, cache = sys.argv[1:4]
ray.init(address=address, log_to_driver=False)
from coun_tune.core.datasets import load_dataset
from coun_tune.core.pipeline import pick_device
from coun_tune.search.trainable import unlearn_trial

def device():
    return str(pick_device())

opt_out = {"env_vars": {"COUN_TUNE_ALLOW_FAKE_GPU": "1"}}
out = {"opt_out": ray.get(ray.remote(num_cpus=1, num_gpus=0.5, runtime_env=opt_out)(device).remote())}
run_info = {"scenario": {"dataset": "digits", "forget": "random:0.1", "seed": 0, "recipe": "tiny"}, "method": "coun",
            "fixed": {"epochs": 1}, "batch_size": None, "seed": 0, "cache_dir": cache, "mia_every": 0, "cpus": 1,
            "mia_epochs": [], "calibration_seeds": [0], "objectives": ["forget_gap", "retain_acc"]}
trainable = tune.with_resources(
    tune.with_parameters(unlearn_trial, data=load_dataset("digits"), run_info=run_info), {"cpu": 1, "gpu": 0.5}
)
grid = tune.Tuner(
    trainable,
    param_space={"lr": 0.05},
    run_config=tune.RunConfig(storage_path=storage, name="cuda", verbose=0,
                              failure_config=tune.FailureConfig(max_failures=0)),
).fit()
result = grid[0]
lines = [l for l in open(result.path + "/error.txt").read().splitlines() if l.strip()]
out["error_last_line"] = lines[-1]
out["metrics"] = sorted(result.metrics or {})
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_a_trial_given_a_gpu_without_cuda_fails_with_one_line(fake_gpu_cluster, tmp_path, prepared, session_cache_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            TRIAL_SCRIPT,
            fake_gpu_cluster["address"],
            str(tmp_path / "tune"),
            str(session_cache_dir),
        ],
        env={**fake_gpu_cluster["env"], "RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"},
        capture_output=True,
        text=True,
        timeout=400,
        start_new_session=True,
    )
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert found, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(found[0][len("RESULT ") :])
    assert out["opt_out"] == "cpu"  # COUN_TUNE_ALLOW_FAKE_GPU=1 on the worker: trains on the CPU
    last = out["error_last_line"]  # the trial logger's `error` tag is this line
    assert "UsageError: this Ray worker on " in last and "sees no CUDA device" in last, last
    assert not any(m in out["metrics"] for m in ("forget_gap", "retain_acc"))  # it trained nothing
