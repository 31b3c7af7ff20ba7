"""Issue 17, point 2: base-model training survives the loss of its node, and trials are retried
as often as a spot cluster needs.

- On a loopback cluster (a head with no CPU for work, one 1-CPU worker), `coun-tune search`
  trains the original on the worker; once it has logged epoch 2 of 8 the worker's whole
  process tree is SIGKILLed (a spot preemption) and a new worker joins (what the autoscaler
  does). The base-model task is retried there and resumes from the checkpoint it saved in
  cache_dir (not from epoch 0), and the cached model is bit-identical to an uninterrupted
  training on the same device type and thread count. The checkpoint is gone once the model is
  cached. Training is slowed by a test hook (a sleep per epoch) so the kill lands mid-way.
- In-process: a training stopped after epoch 3 and resumed ends equal to an uninterrupted one;
  a torn checkpoint is ignored (training starts over) rather than failing.
- `max_failures` in the spec: default 3, -1 allowed, anything else one line and exit 2.
"""

from __future__ import annotations

import hashlib
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from _i17_cluster import LoopbackCluster
from _search_helpers import child_env, cli_command, stop_session, write_spec

from coun_tune.config.search_spec import validate_search_spec
from coun_tune.core.base_models import CHECKPOINT_EVERY_ENV, CHECKPOINT_NAME, TEST_EPOCH_DELAY_ENV, train_from_scratch
from coun_tune.errors import UsageError

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


def test_resumed_training_equals_uninterrupted(digits, scenario, tmp_path, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_EVERY_ENV, "0")
    reference = _train(digits, scenario)
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


def test_a_torn_checkpoint_is_ignored(digits, scenario, tmp_path, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_EVERY_ENV, "0")
    ckpt = tmp_path / CHECKPOINT_NAME
    ckpt.write_bytes(b"not a checkpoint")
    lines: list[str] = []
    model = _train(digits, scenario, lines.append, str(ckpt))
    assert lines[0].startswith("ignoring the training checkpoint") and "training from epoch 0" in lines[0]
    assert lines[1].startswith(f"original: epoch 1/{EPOCHS}")
    assert _same(model, _train(digits, scenario))


def test_checkpoints_are_spaced_by_the_interval(digits, scenario, tmp_path, monkeypatch):
    """The default interval (60 s) on a seconds-long training: no checkpoint is written."""
    monkeypatch.delenv(CHECKPOINT_EVERY_ENV, raising=False)
    ckpt = tmp_path / CHECKPOINT_NAME
    _train(digits, scenario, checkpoint=str(ckpt))
    assert not ckpt.exists()


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


# --- the loopback cluster: the worker is preempted during base-model training ------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _reference_models(scenario, digits, cache: Path) -> dict[str, Path]:
    """Original and oracle trained uninterrupted here, with one thread as in the Ray task."""
    from coun_tune.core.pipeline import prepare

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prep = prepare(scenario, cache_dir=cache, device="cpu", log=lambda s: None, data=digits)
    finally:
        torch.set_num_threads(threads)
    return {role: Path(prep.base.cache_entries[role]) / "model.pt" for role in ("original", "oracle")}


@pytest.mark.slow
def test_base_model_training_resumes_on_a_new_node_after_a_preemption(tmp_path, scenario, digits):
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
    )
    node_env = child_env(
        RAY_AUTH_MODE="token",
        **{CHECKPOINT_EVERY_ENV: "0", TEST_EPOCH_DELAY_ENV: "1.5"},  # every epoch; 1.5 s per epoch
    )
    lines: queue.Queue = queue.Queue()
    seen: list[str] = []
    t0 = time.monotonic()
    try:
        with LoopbackCluster(base) as cluster:
            cluster.add("head", cpus=0, gpus=0, env=node_env)  # the driver's node: no room for tasks
            cluster.add("w1", cpus=1, gpus=0, env=node_env)
            proc = subprocess.Popen(
                cli_command() + ["search", str(spec), "--address", cluster.address],
                cwd=tmp_path,
                env=child_env(RAY_AUTH_MODE="token"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )

            def pump():
                for line in proc.stdout:
                    lines.put(line.rstrip("\n"))
                lines.put(None)

            threading.Thread(target=pump, daemon=True).start()
            try:
                deadline = time.monotonic() + 400
                while True:
                    line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
                    assert line is not None, "the search ended before training the original:\n" + "\n".join(seen)
                    seen.append(line)
                    if line.startswith(f"original: epoch {KILL_AFTER_EPOCH}/{EPOCHS}"):
                        break
                killed = cluster.kill_node("w1")
                killed_at = len(seen)
                cluster.add("w2", cpus=1, gpus=0, env=node_env)  # the replacement spot worker
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
    k = int(resumed[0][1])
    assert KILL_AFTER_EPOCH <= k < EPOCHS, text
    epochs_after = [int(m[1]) for m in (re.match(r"original: epoch (\d+)/", line) for line in after) if m]
    assert epochs_after and epochs_after[-1] == EPOCHS, text
    assert epochs_after[0] > KILL_AFTER_EPOCH - 1 and 1 not in epochs_after, text  # not from epoch 0
    print(f"killed w1 after epoch {KILL_AFTER_EPOCH} ({killed} processes); resumed from epoch {k}; {wall:.0f} s")

    # the same bytes as an uninterrupted training, and no checkpoint left behind
    ref = _reference_models(scenario, digits, tmp_path / "ref_cache")
    for role, ref_path in ref.items():
        got = cache / "models" / ref_path.parent.name / "model.pt"
        assert got.is_file(), f"{role} not cached at {got}"
        assert _sha(got) == _sha(ref_path), f"{role}: the resumed training differs from an uninterrupted one"
    assert not list(cache.rglob(CHECKPOINT_NAME)), list(cache.rglob(CHECKPOINT_NAME))
