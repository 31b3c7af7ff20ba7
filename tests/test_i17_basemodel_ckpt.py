"""Issue 17, point 2: base-model training survives the loss of its node, and trials are retried
as often as a spot cluster needs.

- On a loopback cluster (a head with no CPU for work, one 1-CPU worker), `coun-tune search`
  trains the original on the worker; once it has logged epoch 2 of 8 the worker's whole
  process tree is SIGKILLed (a spot preemption) and a new worker joins (what the autoscaler
  does). The base-model task is retried there and resumes from the checkpoint it saved in
  cache_dir (not from epoch 0), and the cached model is bit-identical to an uninterrupted
  training on the same device type and thread count. The checkpoint is gone once the model is
  cached. Training on the first worker is slowed by a test hook (a sleep per epoch) so the kill
  lands mid-way; the replacement worker trains at full speed.
- With cache_dir on s3:// (moto's S3 server on 127.0.0.1): a training process frozen after
  epoch 2 has its checkpoint object (of epoch 2) in the bucket under the cache prefix; it is
  SIGKILLed; the next run resumes from epoch 2 (the s3:// URI intact in its line), ends
  bit-identical to an uninterrupted training, and leaves no checkpoint object behind.
- In-process: a training stopped after epoch 3 and resumed ends equal to an uninterrupted one;
  a torn checkpoint is ignored (training starts over) rather than failing.
- `max_failures` in the spec: default 3, -1 allowed, anything else one line and exit 2. It is
  also how many times the driver restarts a base-model Ray task whose worker died (a real
  worker death, os._exit, on a local Ray): exactly that many restarts then the Ray error, and
  -1 restarts for ever; the search passes the spec's value.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from _i17_cluster import LoopbackCluster
from _s3_helpers import s3_filesystem
from _search_helpers import child_env, cli_command, stop_session, write_spec

from coun_tune.config.search_spec import validate_search_spec
from coun_tune.core.base_models import CHECKPOINT_EVERY_ENV, CHECKPOINT_NAME, TEST_EPOCH_DELAY_ENV, train_from_scratch
from coun_tune.errors import UsageError

pytest_plugins = ["_s3_helpers"]  # the moto server fixtures: s3_server, s3_env

EPOCHS = 8  # the "tiny" recipe
KILL_AFTER_EPOCH = 2


# --- in-process: resume equals uninterrupted ----------------------------------------------------


class _Preempted(Exception):
    pass


def _fresh_model(digits, scenario):
    from coun_tune.core.models import build_model

    torch.manual_seed(scenario.seed)
    return build_model(scenario.arch_name, digits.image_shape[0], digits.num_classes)


def _train(digits, scenario, log=lambda s: None, checkpoint=None):
    from coun_tune.core.engine import Augmenter

    model = _fresh_model(digits, scenario)
    x, y = torch.from_numpy(digits.train_x), torch.from_numpy(digits.train_y)
    aug = Augmenter(digits.augment, torch.device("cpu"))
    train_from_scratch(model, x, y, aug, scenario.train_recipe, scenario.seed, "original", log, checkpoint)
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def uninterrupted(digits, scenario, tmp_path_factory):
    """The original trained in one go, in this process, given a checkpoint path and the default
    interval (60 s): (the model, that path). Shared by the tests below (one training, not three)."""
    ckpt = tmp_path_factory.mktemp("uninterrupted") / CHECKPOINT_NAME
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(CHECKPOINT_EVERY_ENV, raising=False)
        mp.delenv(TEST_EPOCH_DELAY_ENV, raising=False)
        return _train(digits, scenario, checkpoint=str(ckpt)), ckpt


def test_resumed_training_equals_uninterrupted(digits, scenario, tmp_path, monkeypatch, uninterrupted):
    monkeypatch.setenv(CHECKPOINT_EVERY_ENV, "0")
    reference, _ = uninterrupted
    ckpt = str(tmp_path / CHECKPOINT_NAME)

    def stop_after_3(line):
        if line.startswith("original: epoch 3/"):
            raise _Preempted

    with pytest.raises(_Preempted):
        _train(digits, scenario, stop_after_3, ckpt)
    assert Path(ckpt).is_file()
    torch.manual_seed(12345)  # another process: a different global RNG state before resuming
    lines: list[str] = []
    resumed = _train(digits, scenario, lines.append, ckpt)
    assert lines[0] == f"original: resuming from the checkpoint of epoch 3/{EPOCHS} ({ckpt})"
    assert [line.split()[2] for line in lines[1:]] == [f"{k}/{EPOCHS}" for k in range(4, EPOCHS + 1)]
    assert _same(resumed, reference)


def test_a_torn_checkpoint_is_ignored(digits, scenario, tmp_path, monkeypatch, uninterrupted):
    monkeypatch.setenv(CHECKPOINT_EVERY_ENV, "0")
    ckpt = tmp_path / CHECKPOINT_NAME
    ckpt.write_bytes(b"not a checkpoint")
    lines: list[str] = []
    model = _train(digits, scenario, lines.append, str(ckpt))
    assert lines[0].startswith("ignoring the training checkpoint") and "training from epoch 0" in lines[0]
    assert lines[1].startswith(f"original: epoch 1/{EPOCHS}")
    assert _same(model, uninterrupted[0])


def test_checkpoints_are_spaced_by_the_interval(uninterrupted):
    """The default interval (60 s) on a seconds-long training: no checkpoint is written."""
    _, ckpt = uninterrupted
    assert ckpt.parent.is_dir() and not ckpt.exists()


# --- the reference: original and oracle trained uninterrupted, one thread --------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference_models(scenario, digits, tmp_path_factory) -> dict[str, Path]:
    """model.pt of the original and the oracle trained uninterrupted here, with one thread as in
    a 1-CPU Ray task (and the S3 test's runs): {role: path}; the parent folder's name is the
    cache key, the same under any cache_dir."""
    from coun_tune.core.pipeline import prepare

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv(TEST_EPOCH_DELAY_ENV, raising=False)
            cache = tmp_path_factory.mktemp("ref_cache")
            prep = prepare(scenario, cache_dir=cache, device="cpu", log=lambda s: None, data=digits)
    finally:
        torch.set_num_threads(threads)
    return {role: Path(prep.base.cache_entries[role]) / "model.pt" for role in ("original", "oracle")}


def _pump(proc: subprocess.Popen) -> queue.Queue:
    """proc's stdout lines on a queue (None at its end), read by a thread."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


# --- cache_dir on s3:// ---------------------------------------------------------------------------

S3_BUCKET = "basemodel-ckpt"
STOP_AFTER_EPOCH = 2


def _train_original(scenario, data, cache_dir, log):
    """The original only: ensure_base_models as pipeline.prepare calls it, with roles=("original",).
    Both S3 runs go through it (the first one's process gets its source, see _FROZEN_RUN)."""
    import torch

    from coun_tune.core.base_models import ensure_base_models
    from coun_tune.core.engine import ScenarioData
    from coun_tune.core.splits import materialize_split

    split = materialize_split(data, scenario.forget, scenario.forget_seed, cache_dir)
    scen_data = ScenarioData.build(data, split, torch.device("cpu"))
    return ensure_base_models(data, split, scenario, scen_data, cache_dir, log, roles=("original",))


# The first run: a real training process with cache_dir on S3, frozen (not stopped) once it
# has logged epoch STOP_AFTER_EPOCH of the original, i.e. once that epoch's checkpoint is written.
_FROZEN_RUN = f"""
import json, sys, time, torch
torch.set_num_threads(1)  # as the reference and the resumed run
from coun_tune.core.datasets import load_dataset
from coun_tune.core.recipes import Scenario

def log(line):
    print(line, flush=True)
    if line.startswith(f"original: epoch {{sys.argv[3]}}/"):
        time.sleep(600)  # mid-training: the test looks at the bucket, then SIGKILLs this process

{inspect.getsource(_train_original)}
_train_original(Scenario(**json.loads(sys.argv[2])), load_dataset("digits"), sys.argv[1], log)
"""


def test_an_s3_cache_dir_checkpoints_resumes_and_cleans_up(s3_env, scenario, digits, tmp_path, reference_models):
    endpoint, objects = s3_env["endpoint"], s3_env["objects"]
    s3 = s3_filesystem(endpoint, allow_bucket_creation=True)
    s3.create_dir(S3_BUCKET)  # the bucket exists beforehand, as a search requires
    prefix = f"cache-{tmp_path.name}"
    cache = f"s3://{S3_BUCKET}/{prefix}"
    key = {role: path.parent.name for role, path in reference_models.items()}
    ckpt_key = f"{prefix}/models/{key['original']}/{CHECKPOINT_NAME}"

    proc = subprocess.Popen(
        [sys.executable, "-c", _FROZEN_RUN, cache, json.dumps(scenario.to_dict()), str(STOP_AFTER_EPOCH)],
        env=child_env(**s3_env["env"], **{CHECKPOINT_EVERY_ENV: "0"}),  # a checkpoint every epoch
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen: list[str] = []
    try:
        lines, deadline = _pump(proc), time.monotonic() + 300
        while not (seen and seen[-1].startswith(f"original: epoch {STOP_AFTER_EPOCH}/{EPOCHS}")):
            line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            assert line is not None, f"the training ended before epoch {STOP_AFTER_EPOCH}:\n" + "\n".join(seen)
            seen.append(line)
        # training is under way (frozen between epochs): its checkpoint is in the bucket, nothing else yet
        assert proc.poll() is None
        in_flight = [k for k in objects(S3_BUCKET, prefix) if "/models/" in k]
        assert in_flight == [ckpt_key], in_flight
        with s3.open_input_stream(f"{S3_BUCKET}/{ckpt_key}") as f:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        assert (state["epoch"], state["epochs"]) == (STOP_AFTER_EPOCH, EPOCHS)
        os.killpg(proc.pid, signal.SIGKILL)  # the preemption
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        stop_session(proc.pid, grace=5)
    assert [k for k in objects(S3_BUCKET, prefix) if "/models/" in k] == [ckpt_key]

    # the next run resumes from the checkpoint in the bucket
    out: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_original(scenario, digits, cache, out.append)
    finally:
        torch.set_num_threads(threads)
    text = "\n".join(out)
    ckpt_uri = f"s3://{S3_BUCKET}/{ckpt_key}"  # the URI whole: s3:// with its two slashes
    resumed = f"original: resuming from the checkpoint of epoch {STOP_AFTER_EPOCH}/{EPOCHS} ({ckpt_uri})"
    assert resumed in out, text
    epochs = [int(m[1]) for m in (re.match(r"original: epoch (\d+)/", line) for line in out) if m]
    assert epochs == list(range(STOP_AFTER_EPOCH + 1, EPOCHS + 1)), text  # not from epoch 1
    assert out.index(resumed) < out.index(next(line for line in out if line.startswith("original: epoch ")))

    # the same bytes as an uninterrupted training, and the checkpoint object is gone
    with s3.open_input_stream(f"{S3_BUCKET}/{prefix}/models/{key['original']}/model.pt") as f:
        got = hashlib.sha256(f.read()).hexdigest()
    assert got == _sha(reference_models["original"]), "the resumed training differs from an uninterrupted one"
    left = [k for k in objects(S3_BUCKET, prefix) if "/models/" in k]
    assert left == [f"{prefix}/models/{key['original']}/{n}" for n in ("meta.json", "model.pt")], left


# --- max_failures -------------------------------------------------------------------------------

SPEC = {
    "name": "mf",
    "scenario": {"dataset": "digits", "forget": "random:0.1", "seed": 0, "recipe": "tiny"},
    "method": "coun",
    "objectives": {"forget_gap": "min", "retain_acc": "max"},
    "space": {"lr": {"log": [0.01, 0.1]}, "epochs": 1},
}


def test_max_failures_defaults_to_3_and_takes_minus_one():
    assert validate_search_spec(dict(SPEC)).max_failures == 3
    assert validate_search_spec({**SPEC, "max_failures": -1}).max_failures == -1
    assert validate_search_spec({**SPEC, "max_failures": 0}).max_failures == 0


@pytest.mark.parametrize("bad", [-2, 1.5, "3", True, None])
def test_max_failures_rejects_bad_values(bad):
    with pytest.raises(UsageError, match=r"^max_failures must be an integer >= -1, got "):
        validate_search_spec({**SPEC, "max_failures": bad})


def test_bad_max_failures_is_one_line_exit_2(tmp_path):
    from _search_helpers import run_cli

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({**SPEC, "max_failures": -5}))
    proc = run_cli(["search", "spec.yaml"], cwd=tmp_path, expect_rc=2, timeout=120)
    assert proc.stderr.strip().splitlines() == ["coun-tune: error: max_failures must be an integer >= -1, got -5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # nothing written


def test_the_search_passes_max_failures_to_the_base_model_tasks(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from coun_tune.search import runner, trainable

    class Called(Exception):
        pass

    def fake_ensure_splits(*args, **kwargs):
        raise Called(kwargs)

    monkeypatch.setattr(trainable, "ensure_splits", fake_ensure_splits)
    for value in (7, -1, 0):
        plan = SimpleNamespace(spec=validate_search_spec({**SPEC, "max_failures": value}), cache_dir=str(tmp_path))
        with pytest.raises(Called) as called:
            runner.train_base_models(plan, None, io.StringIO())
        assert called.value.args[0]["max_failures"] == value
    # callers without a spec (coun-tune transfer) get the spec's default
    assert trainable.DEFAULT_MAX_FAILURES == validate_search_spec(dict(SPEC)).max_failures


def test_base_model_task_retries_reject_bad_max_failures():
    from coun_tune.search.trainable import ensure_base_models_streaming

    for bad in (-2, 1.5, True):
        with pytest.raises(ValueError, match="max_failures must be an integer >= -1"):
            ensure_base_models_streaming({}, "unused", None, {"cpu": 1, "gpu": 0}, io.StringIO(), max_failures=bad)


def _dying_stream(marks: str, deaths: int):
    """A stand-in for the base-model task's generator (trainable._base_models_stream) whose worker
    process dies (os._exit: what a preemption does to it) on its first `deaths` runs; each run
    leaves a file in `marks`. Defined in a function, so Ray ships it by value."""

    def stream(scenario, cache_dir, data, cpus, oracle_seeds=1):
        import os

        run = len(os.listdir(marks)) + 1
        open(os.path.join(marks, str(run)), "w").close()
        yield f"run {run}"
        if run <= deaths:
            os._exit(1)
        yield {"run": run}

    return stream


@pytest.mark.slow
def test_a_lost_base_model_task_is_restarted_max_failures_times(tmp_path, monkeypatch):
    """The driver's retry loop (trainable.ensure_base_models_streaming) on a real local Ray whose
    task's worker really dies: max_failures restarts, then the Ray error; -1 has no limit."""
    from coun_tune.search import trainable
    from coun_tune.search.ray_session import RaySession

    def run(name: str, max_failures: int, deaths: int):
        marks = tmp_path / name
        marks.mkdir()
        monkeypatch.setattr(trainable, "_base_models_stream", _dying_stream(str(marks), deaths))
        out = io.StringIO()
        try:
            got = trainable.ensure_base_models_streaming(
                {}, "unused", None, {"cpu": 1, "gpu": 0}, out, max_failures=max_failures
            )
        except trainable._node_lost_errors() as e:
            got = e
        retries = [line for line in out.getvalue().splitlines() if line.startswith("base-model task lost")]
        lost = {e.__name__ for e in trainable._node_lost_errors()}  # (a dead worker: WorkerCrashedError)
        assert all(re.match(r"base-model task lost its worker \((\w+)\)", r)[1] in lost for r in retries), retries
        return got, len(list(marks.iterdir())), [re.sub(r"worker \(\w+\)", "worker (...)", r) for r in retries]

    def said(retry: str) -> str:
        return (
            f"base-model task lost its worker (...); starting it again ({retry}), it resumes from its last checkpoint"
        )

    with RaySession(None, num_cpus=1):
        got, runs, retries = run("two_of_1", 1, deaths=2)  # restarted once, the second loss is raised
        assert isinstance(got, trainable._node_lost_errors()) and (runs, retries) == (2, [said("retry 1 of 1")])
        got, runs, retries = run("never", 0, deaths=1)
        assert isinstance(got, trainable._node_lost_errors()) and (runs, retries) == (1, [])
        deaths = trainable.DEFAULT_MAX_FAILURES + 1  # more than the default allows
        got, runs, retries = run("forever", -1, deaths=deaths)
        assert (got, runs) == ({"run": deaths + 1}, deaths + 1)
        assert retries == [said(f"retry {k}, max_failures -1: no limit") for k in range(1, deaths + 1)]


# --- the loopback cluster: the worker is preempted during base-model training ------------------------


@pytest.mark.slow
def test_base_model_training_resumes_on_a_new_node_after_a_preemption(tmp_path, reference_models):
    base = Path(tempfile.mkdtemp(prefix="ck-", dir="/tmp"))  # short: Ray's socket paths
    cache = tmp_path / "cache"
    spec = write_spec(
        tmp_path / "spec.yaml",
        "preempted",
        cache_dir=cache,
        storage_path=tmp_path / "results",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        num_samples=1,
        max_concurrent_trials=1,
        sampler="random",
        max_failures=2,  # not the default: the base-model task's retries follow it ("retry 1 of 2")
    )
    node_env = child_env(RAY_AUTH_MODE="token", **{CHECKPOINT_EVERY_ENV: "0"})  # a checkpoint every epoch
    slow_env = {**node_env, TEST_EPOCH_DELAY_ENV: "1.5"}  # 1.5 s per epoch: the kill lands mid-training
    seen: list[str] = []
    t0 = time.monotonic()
    try:
        with LoopbackCluster(base) as cluster:
            cluster.add("head", cpus=0, gpus=0, env=node_env)  # the driver's node: no room for tasks
            cluster.add("w1", cpus=1, gpus=0, env=slow_env)
            proc = subprocess.Popen(
                cli_command() + ["search", str(spec), "--address", cluster.address],
                cwd=tmp_path,
                env=child_env(RAY_AUTH_MODE="token"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            try:
                lines, deadline = _pump(proc), time.monotonic() + 400
                while True:
                    line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
                    assert line is not None, "the search ended before training the original:\n" + "\n".join(seen)
                    seen.append(line)
                    if line.startswith(f"original: epoch {KILL_AFTER_EPOCH}/{EPOCHS}"):
                        break
                killed = cluster.kill_node("w1")
                killed_at = len(seen)
                cluster.add("w2", cpus=1, gpus=0, env=node_env)  # the replacement spot worker, at full speed
                while (line := lines.get(timeout=max(1.0, deadline + 200 - time.monotonic()))) is not None:
                    seen.append(line)
                rc = proc.wait(timeout=60)
            finally:
                stop_session(proc.pid, grace=10)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    wall = time.monotonic() - t0
    text = "\n".join(seen)
    (tmp_path / "search_output.txt").write_text(text)
    assert rc == 0, text[-4000:]
    assert killed > 0
    after = seen[killed_at:]
    resumed = [re.match(r"original: resuming from the checkpoint of epoch (\d+)/(\d+)", line) for line in after]
    resumed = [m for m in resumed if m]
    assert resumed, f"the retried task did not resume from a checkpoint:\n{text[-4000:]}"
    retry = r"base-model task lost its worker \(\w+\); starting it again \(retry 1 of 2\)"
    assert any(re.match(retry, line) for line in after), text[-4000:]
    k = int(resumed[0][1])
    assert KILL_AFTER_EPOCH <= k < EPOCHS, text
    epochs_after = [int(m[1]) for m in (re.match(r"original: epoch (\d+)/", line) for line in after) if m]
    assert epochs_after and epochs_after[-1] == EPOCHS, text
    assert epochs_after[0] > KILL_AFTER_EPOCH - 1 and 1 not in epochs_after, text  # not from epoch 0
    print(f"killed w1 after epoch {KILL_AFTER_EPOCH} ({killed} processes); resumed from epoch {k}; {wall:.0f} s")

    # the same bytes as an uninterrupted training, and no checkpoint left behind
    for role, ref_path in reference_models.items():
        got = cache / "models" / ref_path.parent.name / "model.pt"
        assert got.is_file(), f"{role} not cached at {got}"
        assert _sha(got) == _sha(ref_path), f"{role}: the resumed training differs from an uninterrupted one"
    assert not list(cache.rglob(CHECKPOINT_NAME)), list(cache.rglob(CHECKPOINT_NAME))
