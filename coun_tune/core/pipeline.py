"""From a scenario to unlearned metrics: the path `coun-tune unlearn` and every search trial
take. Load data -> split registry -> device-resident splits -> cached original/oracle ->
unlearn -> metrics with gaps to the oracle."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coun_tune.core.base_models import BaseModels, default_cache_dir, ensure_base_models
from coun_tune.core.datasets import DatasetArrays, load_dataset
from coun_tune.core.engine import EpochReport, ScenarioData, run_unlearning, unlearning_epochs
from coun_tune.core.recipes import Scenario
from coun_tune.core.splits import Split, materialize_split, sequential_splits
from coun_tune.errors import UsageError

# A Ray worker that was given a GPU but whose torch sees none would train on the CPU, hours
# instead of minutes, without a word: it fails instead, unless this is set to 1 (the loopback
# tests declare fake GPUs with `ray start --num-gpus`, on machines that have none).
ALLOW_FAKE_GPU_ENV = "COUN_TUNE_ALLOW_FAKE_GPU"


def ray_assigned_gpus() -> float:
    """The GPUs Ray assigned to this process when it is a Ray task or actor (a trial, a
    base-model task); 0 elsewhere. Ray is only looked at if it is already imported: the engine
    runs on a box with torch alone."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None:
        return 0.0
    try:
        from ray._private.worker import WORKER_MODE, global_worker

        if not ray.is_initialized() or global_worker.mode != WORKER_MODE:
            return 0.0
        return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    except Exception:  # a Ray without these internals: no check rather than a failed run
        return 0.0


def cuda_missing_message(gpus: float) -> str:
    import os
    import socket

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (
        f"this Ray worker on {socket.gethostname()} was given {gpus:g} GPU (resources_per_trial.gpu) but torch "
        f"{torch.__version__} ({build}) sees no CUDA device (CUDA_VISIBLE_DEVICES={visible!r}); refusing to train "
        f"on the CPU: check the node's NVIDIA driver and torch build, or set {ALLOW_FAKE_GPU_ENV}=1 on the nodes "
        "to train on the CPU anyway"
    )


def pick_device(requested: str | None = None) -> torch.device:
    """The training device: `requested` if given, else CUDA when present, else CPU. Inside a
    Ray trial this is decided by torch.cuda.is_available(), never by Ray's GPU ids; a Ray
    worker that was given a GPU and sees no CUDA raises UsageError (ALLOW_FAKE_GPU_ENV)."""
    import os

    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    gpus = ray_assigned_gpus()
    if gpus > 0 and os.environ.get(ALLOW_FAKE_GPU_ENV, "") != "1":
        raise UsageError(cuda_missing_message(gpus))
    return torch.device("cpu")


@dataclass
class Prepared:
    scenario: Scenario
    data: DatasetArrays
    split: Split
    scen_data: ScenarioData
    base: BaseModels

    @property
    def batch_size(self) -> int:
        return self.scenario.defaults.batch_size


def prepare(
    scenario: Scenario,
    cache_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    log: Callable[[str], None] = print,
    data: DatasetArrays | None = None,
    train_missing: bool = True,
) -> Prepared:
    """Everything a run needs before unlearning starts. `data` may be passed in (a search puts
    it in the Ray object store once and hands it to every trial)."""
    cache_dir = str(cache_dir) if cache_dir else str(default_cache_dir())  # a path or s3:// (never Path(): it eats //)
    device = pick_device(str(device) if device else None)
    if data is None:
        data = load_dataset(scenario.dataset, scenario.data_root)
    if scenario.sequential:
        raise ValueError("a sequential scenario runs through unlearn_sequential(), not prepare()")
    split = materialize_split(data, scenario.forget, scenario.forget_seed, cache_dir)
    scen_data = ScenarioData.build(data, split, device)
    base = ensure_base_models(data, split, scenario, scen_data, cache_dir, log, train_missing=train_missing)
    return Prepared(scenario, data, split, scen_data, base)


def _run_args(prep: Prepared, batch_size: int | None, seed: int | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fresh copy of theta_o to unlearn, and the arguments every run on `prep` shares."""
    model = copy.deepcopy(prep.base.original).train().requires_grad_(True)
    return model, {
        "original": prep.base.original,
        "scenario": prep.scen_data,
        "batch_size": batch_size or prep.batch_size,
        "seed": prep.scenario.seed if seed is None else seed,
        "oracle_metrics": prep.base.oracle_metrics,
    }


def unlearn(
    prep: Prepared,
    method: str,
    hparams: dict[str, Any],
    batch_size: int | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Unlearn a copy of theta_o; returns (theta_u, its final metrics with gaps to the oracle).
    `seed` (default: the scenario's) drives augmentation and batch order."""
    model, args = _run_args(prep, batch_size, seed)
    return model, run_unlearning(model, method_name=method, hparams=hparams, **args, **kwargs)


def unlearn_epochs(
    prep: Prepared,
    method: str,
    hparams: dict[str, Any],
    batch_size: int | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> tuple[torch.nn.Module, Iterator[EpochReport]]:
    """unlearn() one epoch at a time: (the model being unlearned, a generator that trains one
    epoch per next() and yields its EpochReport). A search trial calibrated on several forget
    sets steps one of these per split in lock step."""
    model, args = _run_args(prep, batch_size, seed)
    return model, unlearning_epochs(model, method_name=method, hparams=hparams, **args, **kwargs)


def unlearn_sequential(
    scenario: Scenario,
    method: str,
    hparams: dict[str, Any],
    batch_size: int | None = None,
    seed: int | None = None,
    cache_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    log: Callable[[str], None] = print,
    data: DatasetArrays | None = None,
) -> tuple[torch.nn.Module, list[dict]]:
    """Sequential forgetting: apply scenario.forget's requests in turn, each unlearning run
    starting from the previous one's model, and measure after each request against the oracle
    of the data remaining at that point (trained, or read from the cache, per request).
    Returns (final model, one record per request: its split, the oracle's and the model's metrics)."""
    cache_dir = str(cache_dir) if cache_dir else str(default_cache_dir())  # a path or s3:// (never Path(): it eats //)
    device = pick_device(str(device) if device else None)
    data = data if data is not None else load_dataset(scenario.dataset, scenario.data_root)
    splits = sequential_splits(data, list(scenario.forget), scenario.forget_seed, cache_dir)
    model, records = None, []
    for k, split in enumerate(splits):
        scen_data = ScenarioData.build(data, split, device)
        base = ensure_base_models(data, split, scenario, scen_data, cache_dir, log)
        start = base.original if model is None else model
        model = copy.deepcopy(start).train().requires_grad_(True)
        log(f"request {k + 1}/{len(splits)}: forgetting {split.spec} ({len(split.forget_idx)} samples removed so far)")
        # the model entering this request is the method's theta_o: SalUn's mask, NoT's negated
        # layer and SCRUB/BadTeacher's teachers are taken from it, not from the first original
        metrics = run_unlearning(
            model,
            start,
            scen_data,
            method,
            hparams,
            batch_size=batch_size or scenario.defaults.batch_size,
            seed=(scenario.seed if seed is None else seed) + k,
            oracle_metrics=base.oracle_metrics,
        )
        records.append(
            {
                "request": k + 1,
                "spec": split.spec,
                "split_hash": split.split_hash,
                "num_forget": int(len(split.forget_idx)),
                "num_retain": int(len(split.retain_idx)),
                "original": base.original_metrics,
                "oracle": base.oracle_metrics,
                "unlearned": metrics,
            }
        )
    return model, records
