"""The Ray Tune trainable: one trial = one unlearning run with a sampled config.

The dataset arrives once through the object store (`tune.with_parameters`); the original and
the oracle come from the base-model cache (the driver made sure they exist before the tuner
started). Every epoch the trial reports its metrics; at its checkpoint epochs (every
`checkpoint_every` epochs, the last epoch and mo_asha's rungs: checkpoint_epoch) the report
carries a checkpoint (model, optimiser, scheduler, method and RNG state), from which a retried
or restored trial resumes exactly: the epochs after it re-run, and re-run the same (the RNG
state is in the checkpoint).

A checkpoint directory: model.pt (the first calibration split's model, a plain state dict: the
trial's model, what the MLflow logger logs), state.pt (every split's resume state; the first
split's without its model, which is model.pt: one copy of each network), config.yaml,
metrics.json.
"""

from __future__ import annotations

import json
import queue
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
from coun_tune.core.pipeline import prepare
from coun_tune.core.recipes import Scenario
from coun_tune.errors import UsageError
from coun_tune.report import STDOUT
from coun_tune.tracking.trial_logger import EPOCHS_PLANNED

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"


def checkpoint_epoch(epoch: int, planned: int, run_info: dict) -> bool:
    """Whether the report of `epoch` (1-based) of a trial of `planned` epochs carries a
    checkpoint: every `checkpoint_every` epochs, at the last epoch (the trial's model) and at
    the scheduler's rung epochs (a trial stopped there keeps its config and model). run_info of
    a search started before checkpoint_every existed: every epoch, as then."""
    every = run_info.get("checkpoint_every")
    if every is None:
        return True
    return epoch == planned or epoch % int(every) == 0 or epoch in set(run_info.get("rung_epochs", ()))


def trial_config(run_info: dict, hparams: dict[str, Any]) -> dict:
    """The `coun-tune unlearn --config` document that reproduces this trial."""
    cfg = {"scenario": run_info["scenario"], "method": run_info["method"], "hparams": hparams, "seed": run_info["seed"]}
    if run_info.get("batch_size"):
        cfg["batch_size"] = run_info["batch_size"]
    return cfg


def calibration_seeds(run_info: dict) -> list[int]:
    """The split seeds a trial is scored on (a spec without `calibration`: the scenario's own)."""
    seeds = run_info.get("calibration_seeds")
    return [int(s) for s in seeds] if seeds else [Scenario(**run_info["scenario"]).forget_seed]


def split_states(saved: dict, seeds: list[int]) -> dict[int, dict]:
    """The per-split resume states in a trial checkpoint ({"splits": {"<seed>": state}})."""
    return {s: saved["splits"][str(s)] for s in seeds if str(s) in saved.get("splits", {})}


def save_checkpoint(d: Path, states: dict[int, dict], first: int) -> None:
    """state.pt and model.pt of one checkpoint: the first split's model goes to model.pt only."""
    model = states[first]["model"]
    torch.save({k: v.detach().cpu() for k, v in model.items()}, d / MODEL_FILE)
    splits = {str(s): ({k: v for k, v in st.items() if k != "model"} if s == first else st) for s, st in states.items()}
    torch.save({"splits": splits}, d / STATE_FILE)


def load_checkpoint(d: Path, seeds: list[int], device) -> dict[int, dict]:
    """save_checkpoint's inverse: every split's resume state, the first split's model read back
    from model.pt (a checkpoint written before that, with the model in state.pt too, loads as is)."""
    states = split_states(torch.load(d / STATE_FILE, map_location=device, weights_only=True), seeds)
    first = states.get(seeds[0])
    if first is not None and "model" not in first:
        first["model"] = torch.load(d / MODEL_FILE, map_location=device, weights_only=True)
    return states


def unlearn_trial(config: dict, data: DatasetArrays, run_info: dict) -> None:
    """config: the sampled hyperparameters. run_info: scenario, method, fixed hyperparameters,
    batch size, unlearning seed, cache dir, MIA cadence (mia_every, and mia_epochs: the early-
    stopping rungs when an objective needs the MIA), this trial's CPU share, the calibration
    split seeds, the objectives, and checkpoint_every / rung_epochs (see checkpoint_epoch).

    The config runs on every calibration split (one original; each split its own oracle), one
    epoch on each in turn, and each epoch's report is calibration.summarise_splits of the
    splits' metrics: every metric's mean under its own name (what the sampler and mo_asha read)
    plus <objective>_std and <objective>_split<seed>. A checkpoint holds every split's state,
    so a retried trial goes on from it on every split. The trial's model (model.pt) is the
    first split's. Every report carries `epochs_planned`, so a result short of it marks an
    early stop."""
    from coun_tune.calibration import summarise_splits
    from coun_tune.core.pipeline import unlearn_epochs

    torch.set_num_threads(max(1, int(run_info.get("cpus", 1))))
    scenario = Scenario(**run_info["scenario"])
    seeds = calibration_seeds(run_info)
    preps = {
        s: prepare(scenario.with_split(s), run_info["cache_dir"], log=lambda line: None, data=data, train_missing=False)
        for s in seeds
    }
    hparams = {**run_info["fixed"], **config}
    states: dict[int, dict] = {}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            device = preps[seeds[0]].scen_data.retain.x.device
            states = load_checkpoint(Path(d), seeds, device)
    exported = trial_config(run_info, {k: (v.item() if hasattr(v, "item") else v) for k, v in hparams.items()})
    planned = int(resolve_hparams(run_info["method"], hparams)["epochs"])
    detail = list(dict.fromkeys([*run_info.get("objectives", []), "forget_gap", "retain_acc"]))
    runs = {}
    for s in seeds:
        _, runs[s] = unlearn_epochs(
            preps[s],
            run_info["method"],
            hparams,
            batch_size=run_info.get("batch_size"),
            seed=run_info["seed"],
            resume=states.get(s),
            mia_every=run_info.get("mia_every", 0),
            mia_epochs=run_info.get("mia_epochs", ()),
        )
    for reports in zip(*runs.values()):  # one epoch on every split, then one report
        if any(r.make_checkpoint is None for r in reports):  # resumed after the last epoch
            continue
        metrics = summarise_splits({s: r.metrics for s, r in zip(seeds, reports)}, detail)
        if not checkpoint_epoch(reports[0].epoch, planned, run_info):
            tune.report({**metrics, EPOCHS_PLANNED: planned})
            continue
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(Path(d), {s: r.make_checkpoint() for s, r in zip(seeds, reports)}, seeds[0])
            (Path(d) / "config.yaml").write_text(yaml.safe_dump(exported, sort_keys=False))
            (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
            tune.report({**metrics, EPOCHS_PLANNED: planned}, checkpoint=tune.Checkpoint.from_directory(d))


def ensure_base_models_task(
    scenario: dict,
    cache_dir: str,
    data: DatasetArrays,
    cpus: int,
    log: Callable[[str], None] | None = None,
    oracle_seeds: int = 1,
) -> dict:
    """Run as a Ray task before the tuner starts: train theta_o / theta_r if the cache lacks
    them (and, with oracle_seeds >= 2, the extra oracles of the noise floor). Returns what the
    driver prints: metrics, whether each came from the cache, and `oracle_noise` (the mean
    gaps of the extra oracles to theta_r; {} when not measured). `log` gets each progress line
    as it happens (one per training epoch)."""
    torch.set_num_threads(max(1, cpus))
    lines: list[str] = []

    def record(line: str) -> None:
        lines.append(line)
        if log is not None:
            log(line)

    prep = prepare(Scenario(**scenario), cache_dir, log=record, data=data)
    noise = {}
    if oracle_seeds >= 2:
        from coun_tune.core.base_models import oracle_seed_spread

        noise = oracle_seed_spread(
            prep.data,
            prep.split,
            prep.scenario,
            prep.scen_data,
            cache_dir,
            prep.base.oracle_metrics,
            oracle_seeds,
            record,
        )
    return {
        "oracle_noise": noise,
        "original": prep.base.original_metrics,
        "oracle": prep.base.oracle_metrics,
        "from_cache": prep.base.from_cache,
        "log": lines,
        "split_hash": prep.split.split_hash,
        "num_forget": int(len(prep.split.forget_idx)),
        "num_retain": int(len(prep.split.retain_idx)),
    }


_DONE = object()


def _base_models_stream(scenario: dict, cache_dir: str, data: DatasetArrays, cpus: int, oracle_seeds: int = 1):
    """A Ray streaming-generator task: yields each progress line (str) as training produces it,
    then the result dict of ensure_base_models_task. Training runs in a thread of the task and
    hands lines over a queue, because the core training loop reports through a callback."""
    lines: queue.Queue = queue.Queue()
    box: dict = {}

    def work() -> None:
        try:
            box["result"] = ensure_base_models_task(scenario, cache_dir, data, cpus, lines.put, oracle_seeds)
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


# How many times a base-model task is started again after losing its worker or node (a spot
# preemption): the spec's `max_failures`, with Tune's FailureConfig meaning (-1: for ever, 0:
# never), so the base models survive as many preemptions as a trial does. Each run resumes the
# training from its last checkpoint in cache_dir (base_models.CHECKPOINT_NAME). The driver
# retries, not Ray (max_retries=0): Ray's retry of a streaming task drops the new run's first
# lines (as many as the lost run had sent), "resuming from epoch k" among them.
DEFAULT_MAX_FAILURES = 3  # the spec's default (config.search_spec), for callers without a spec


def _node_lost_errors() -> tuple[type, ...]:
    from ray import exceptions as x

    return (x.WorkerCrashedError, x.NodeDiedError, x.LocalRayletDiedError, x.ObjectLostError, x.OutOfMemoryError)


def _retry_label(retry: int, max_failures: int) -> str:
    return f"retry {retry} of {max_failures}" if max_failures >= 0 else f"retry {retry}, max_failures -1: no limit"


def ensure_base_models_streaming(
    scenario: dict,
    cache_dir: str,
    data_ref,
    resources: dict,
    out=STDOUT,
    oracle_seeds: int = 1,
    prefix: str = "",
    max_failures: int = DEFAULT_MAX_FAILURES,
) -> dict:
    """Make sure theta_o and theta_r are in the cache (training them in a Ray task on whichever
    node has the resources) and print the task's progress lines to `out` as they arrive: the
    driver's init_ray sets log_to_driver=False, so a task's stdout would never reach it.
    resources: {"cpu": ..., "gpu": ...}; `prefix` starts every printed line (which split it is
    when several train at once). Returns ensure_base_models_task's dict; a UsageError
    raised on the worker (a corrupted cache file, say) is raised here as itself. A task whose
    worker or node is lost is started again, up to `max_failures` times (the spec's key; -1:
    for ever), and resumes training from its checkpoint; the next loss raises the Ray error."""
    import ray

    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < -1:
        raise ValueError(f"max_failures must be an integer >= -1, got {max_failures!r}")
    task = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"], num_returns="streaming", max_retries=0)(
        _base_models_stream
    )
    retries = 0
    while True:
        try:
            for ref in task.remote(scenario, cache_dir, data_ref, int(max(1, resources["cpu"])), oracle_seeds):
                item = ray.get(ref)
                if isinstance(item, dict):
                    return item
                print(prefix + item, file=out, flush=True)
        except ray.exceptions.RayTaskError as e:  # bad input found on the worker: its one line, not a traceback
            if isinstance(e.cause, UsageError):
                raise e.cause from None
            raise
        except _node_lost_errors() as e:
            if 0 <= max_failures <= retries:
                raise
            retries += 1
            print(
                f"{prefix}base-model task lost its worker ({type(e).__name__}); starting it again "
                f"({_retry_label(retries, max_failures)}), it resumes from its last checkpoint",
                file=out,
                flush=True,
            )
            continue
        raise RuntimeError("the base-model task ended without a result")


def ensure_splits(
    scenario: Scenario,
    seeds: list[int],
    cache_dir: str,
    data_ref,
    resources: dict,
    out=STDOUT,
    oracle_seeds: int = 1,
    max_failures: int = DEFAULT_MAX_FAILURES,
) -> dict[int, dict]:
    """ensure_base_models_streaming for the forget sets drawn by each split seed: the first
    goes alone (it trains the original every split shares, and the extra oracles of the noise
    floor when oracle_seeds >= 2), then the others' oracles train in parallel Ray tasks (as
    many at once as the cluster has room for), each printed line prefixed by its split. A task
    that loses its node is started again up to `max_failures` times (-1: for ever), each on its
    own. Returns {seed: the task's result}."""
    from concurrent.futures import ThreadPoolExecutor

    several = len(seeds) > 1

    def one(seed: int, n_oracles: int = 1) -> dict:
        return ensure_base_models_streaming(
            scenario.with_split(seed).to_dict(),
            cache_dir,
            data_ref,
            resources,
            out,
            oracle_seeds=n_oracles,
            prefix=f"[split {seed}] " if several else "",
            max_failures=max_failures,
        )

    results = {seeds[0]: one(seeds[0], oracle_seeds)}
    if several:
        with ThreadPoolExecutor(max_workers=min(8, len(seeds) - 1)) as pool:
            results.update(zip(seeds[1:], pool.map(one, seeds[1:])))
        trained = sum(not r["from_cache"]["oracle"] for r in results.values())
        print(
            f"oracles of {len(seeds)} forget sets: {trained} trained now, {len(seeds) - trained} from the cache",
            file=out,
        )
    return results
