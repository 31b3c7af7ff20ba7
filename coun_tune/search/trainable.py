"""The Ray Tune trainable: one trial = one unlearning run with a sampled config.

The dataset arrives once through the object store (`tune.with_parameters`); the original and
the oracle come from the base-model cache (the driver made sure they exist before the tuner
started). Every epoch the trial reports its metrics with a checkpoint (model, optimiser,
scheduler, method and RNG state); a retried or restored trial resumes from it exactly.
"""

from __future__ import annotations

import json
import queue
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from ray import tune

from coun_tune.core.datasets import DatasetArrays
from coun_tune.core.engine import resolve_hparams
from coun_tune.core.pipeline import prepare, unlearn
from coun_tune.core.recipes import Scenario
from coun_tune.errors import UsageError
from coun_tune.tracking.trial_logger import EPOCHS_PLANNED

STATE_FILE = "state.pt"


def trial_config(run_info: dict, hparams: dict[str, Any]) -> dict:
    """The `coun-tune unlearn --config` document that reproduces this trial."""
    cfg = {"scenario": run_info["scenario"], "method": run_info["method"], "hparams": hparams, "seed": run_info["seed"]}
    if run_info.get("batch_size"):
        cfg["batch_size"] = run_info["batch_size"]
    return cfg


def unlearn_trial(config: dict, data: DatasetArrays, run_info: dict) -> None:
    """config: the sampled hyperparameters. run_info: scenario, method, fixed hyperparameters,
    batch size, unlearning seed, cache dir, MIA cadence (mia_every, and mia_epochs: the early-
    stopping rungs when an objective needs the MIA) and this trial's CPU share.
    Every report carries `epochs_planned`, so a result short of it marks an early stop."""
    torch.set_num_threads(max(1, int(run_info.get("cpus", 1))))
    scenario = Scenario(**run_info["scenario"])
    prep = prepare(scenario, run_info["cache_dir"], log=lambda s: None, data=data, train_missing=False)
    hparams = {**run_info["fixed"], **config}
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, map_location=prep.scen_data.retain.x.device, weights_only=True)
    exported = trial_config(run_info, {k: (v.item() if hasattr(v, "item") else v) for k, v in hparams.items()})
    planned = int(resolve_hparams(run_info["method"], hparams)["epochs"])

    def on_epoch(epoch: int, metrics: dict, make_checkpoint) -> None:
        with tempfile.TemporaryDirectory() as d:
            state = make_checkpoint()
            torch.save(state, Path(d) / STATE_FILE)
            torch.save({k: v.detach().cpu() for k, v in state["model"].items()}, Path(d) / "model.pt")
            (Path(d) / "config.yaml").write_text(yaml.safe_dump(exported, sort_keys=False))
            (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
            tune.report({**metrics, EPOCHS_PLANNED: planned}, checkpoint=tune.Checkpoint.from_directory(d))

    unlearn(
        prep,
        run_info["method"],
        hparams,
        batch_size=run_info.get("batch_size"),
        seed=run_info["seed"],
        on_epoch=on_epoch,
        resume=resume,
        mia_every=run_info.get("mia_every", 0),
        mia_epochs=run_info.get("mia_epochs", ()),
    )


def ensure_base_models_task(
    scenario: dict, cache_dir: str, data: DatasetArrays, cpus: int, log: Callable[[str], None] | None = None
) -> dict:
    """Run as a Ray task before the tuner starts: train theta_o / theta_r if the cache lacks
    them. Returns what the driver prints: metrics and whether each came from the cache.
    `log` gets each progress line as it happens (one per training epoch)."""
    torch.set_num_threads(max(1, cpus))
    lines: list[str] = []

    def record(line: str) -> None:
        lines.append(line)
        if log is not None:
            log(line)

    prep = prepare(Scenario(**scenario), cache_dir, log=record, data=data)
    return {
        "original": prep.base.original_metrics,
        "oracle": prep.base.oracle_metrics,
        "from_cache": prep.base.from_cache,
        "log": lines,
        "split_hash": prep.split.split_hash,
        "num_forget": int(len(prep.split.forget_idx)),
        "num_retain": int(len(prep.split.retain_idx)),
    }


_DONE = object()


def _base_models_stream(scenario: dict, cache_dir: str, data: DatasetArrays, cpus: int):
    """A Ray streaming-generator task: yields each progress line (str) as training produces it,
    then the result dict of ensure_base_models_task. Training runs in a thread of the task and
    hands lines over a queue, because the core training loop reports through a callback."""
    lines: queue.Queue = queue.Queue()
    box: dict = {}

    def work() -> None:
        try:
            box["result"] = ensure_base_models_task(scenario, cache_dir, data, cpus, log=lines.put)
        except BaseException as e:  # re-raised in the task below, so Ray reports it as the task's error
            box["error"] = e
        finally:
            lines.put(_DONE)

    worker = threading.Thread(target=work, name="base-models", daemon=True)
    worker.start()
    while (line := lines.get()) is not _DONE:
        yield line
    worker.join()
    if "error" in box:
        raise box["error"]
    yield box["result"]


def ensure_base_models_streaming(scenario: dict, cache_dir: str, data_ref, resources: dict, out=sys.stdout) -> dict:
    """Make sure theta_o and theta_r are in the cache (training them in a Ray task on whichever
    node has the resources) and print the task's progress lines to `out` as they arrive: the
    driver's init_ray sets log_to_driver=False, so a task's stdout would never reach it.
    resources: {"cpu": ..., "gpu": ...}. Returns ensure_base_models_task's dict; a UsageError
    raised on the worker (a corrupted cache file, say) is raised here as itself."""
    import ray

    task = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"], num_returns="streaming")(
        _base_models_stream
    )
    try:
        for ref in task.remote(scenario, cache_dir, data_ref, int(max(1, resources["cpu"]))):
            item = ray.get(ref)
            if isinstance(item, dict):
                return item
            print(item, file=out, flush=True)
    except ray.exceptions.RayTaskError as e:  # bad input found on the worker: its one line, not a traceback
        if isinstance(e.cause, UsageError):
            raise e.cause from None
        raise
    raise RuntimeError("the base-model task ended without a result")
