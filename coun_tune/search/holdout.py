"""Re-running configs on forget sets as Ray tasks: the hold-out check of a search's front (after
its trials) and `coun-tune transfer` (later, on a search without one) take this one path.

Each (config, split seed) is one Ray task with the trial's resources, so on a cluster the
runs land on the GPU workers, never on the CPU-only head where the driver runs. Tasks run as
many at once as the cluster has room for; each finished run is handed to `on_record` as it
arrives (the caller persists it, so an interrupted check repeats nothing finished).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import torch

from coun_tune.core.datasets import DatasetArrays
from coun_tune.report import STDOUT

# Tests only: the driver sends itself SIGINT (a Ctrl-C) once this many hold-out runs finished.
TEST_SIGINT_ENV = "COUN_TUNE_TEST_SIGINT_AFTER_HOLDOUT_RUNS"


def run_on_split(
    config_doc: dict, split_seed: int, cache_dir: str, data: DatasetArrays, cpus: int, device: str | None = None
) -> dict:
    """One config (a `coun-tune unlearn --config` document) unlearned on the forget set drawn
    by `split_seed`, against that split's oracle (already in the cache). Returns its final
    metrics (core.metrics names), the Ray node it ran on (`node_id`) and the worker's `pid`."""
    import ray

    from coun_tune.config.unlearn_config import build_unlearn_config
    from coun_tune.core.pipeline import prepare, unlearn

    torch.set_num_threads(max(1, cpus))
    cfg = build_unlearn_config(config_doc, {})
    prep = prepare(
        cfg.scenario.with_split(split_seed), cache_dir, device, log=lambda line: None, data=data, train_missing=False
    )
    _, metrics = unlearn(prep, cfg.method, cfg.hparams, batch_size=cfg.batch_size, seed=cfg.seed)
    return {
        **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
    }


def run_configs(
    configs: dict[str, dict],
    split_seeds: list[int],
    cache_dir: str,
    data_ref,
    resources: dict,
    done: set[tuple[str, int]],
    on_record: Callable[[dict], None],
    log: Callable[[str], None] = print,
    device: str | None = None,
    labels: dict[str, str] | None = None,
) -> int:
    """Run every config of `configs` ({key: config document}, e.g. the trial run id) on every
    split seed, except the (key, seed) pairs in `done`. Each finished run calls
    on_record({"key", "split_seed", "node_id", metric: value, ...}) in the driver. A task's
    UsageError comes back as itself. Returns the number of runs made."""
    import ray

    from coun_tune.errors import UsageError

    task = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"], max_retries=3)(run_on_split)
    cpus = int(max(1, resources["cpu"]))
    pending = {
        task.remote(doc, seed, cache_dir, data_ref, cpus, device): (key, seed)
        for key, doc in configs.items()
        for seed in split_seeds
        if (key, seed) not in done
    }
    total, finished = len(pending), 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            key, seed = pending.pop(ready[0])
            try:
                metrics = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, UsageError):
                    raise e.cause from None
                raise
            finished += 1
            on_record({"key": key, "split_seed": seed, **metrics})
            log(f"hold-out run {finished}/{total}: {(labels or {}).get(key, key)} on split {seed} done")
            if os.environ.get(TEST_SIGINT_ENV) == str(finished):
                os.kill(os.getpid(), signal.SIGINT)
    finally:
        for ref in pending:  # interrupted: nothing left running on the cluster
            ray.cancel(ref, force=True)
    return total


def transfer_check(
    client,
    parent_run_id: str,
    split_seeds: list[int],
    cache_dir: str | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
    out=STDOUT,
) -> dict[str, dict[str, float]]:
    """`coun-tune transfer`: the hold-out check of a finished search, later (a search whose
    spec had no `holdout`, or more splits). The same path as the search's own check: the
    splits' oracles by Ray tasks (trained once, cached), the calibration front re-run on them
    as Ray tasks on a local Ray of our own, logged by tracking.holdout (after which review and
    export pick on the hold-out means). Returns tracking.holdout.summarise's dict."""
    import ray

    from coun_tune.config.unlearn_config import build_unlearn_config
    from coun_tune.core.base_models import default_cache_dir
    from coun_tune.core.datasets import load_dataset
    from coun_tune.search.ray_session import RaySession
    from coun_tune.search.trainable import ensure_splits
    from coun_tune.tracking.holdout import calibration_front, front_configs, validate_front
    from coun_tune.tracking.review import _parent_json

    parent = client.get_run(parent_run_id)
    configs = front_configs(client, calibration_front(client, parent))  # a search without trials fails here
    cfg = build_unlearn_config(next(iter(configs.values())), {})
    data = load_dataset(cfg.scenario.dataset, cfg.scenario.data_root)
    spec = _parent_json(client, parent_run_id, "spec.yaml") or {}
    res = spec.get("resources_per_trial") or {}
    gpu = float(res.get("gpu", 0)) if torch.cuda.is_available() and device != "cpu" else 0.0
    resources = {"cpu": float(res.get("cpu", 1)), "gpu": gpu}
    cache = str(cache_dir) if cache_dir else str(default_cache_dir())
    noise = (_parent_json(client, parent_run_id, "base_models.json") or {}).get("oracle_noise") or {}
    with RaySession(None, log=log):
        data_ref = ray.put(data)
        bases = ensure_splits(
            cfg.scenario,
            list(split_seeds),
            cache,
            data_ref,
            resources,
            out=_LogWriter(log),
            max_failures=int(spec.get("max_failures", 3)),  # the search's own retry budget
        )
        reference = {s: bases[s]["original"] for s in split_seeds}
        return validate_front(
            client,
            parent_run_id,
            list(split_seeds),
            lambda cfgs, done, on_record, labels: run_configs(
                cfgs,
                list(split_seeds),
                cache,
                data_ref,
                resources,
                done,
                on_record,
                log=log,
                device=device,
                labels=labels,
            ),
            reference,
            noise,
            out=out,
        )


class _LogWriter:
    """A file-like `out` that hands each printed line to `log` (progress goes to stderr)."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log

    def write(self, text: str) -> None:
        if text.strip():
            self.log(text.rstrip("\n"))

    def flush(self) -> None:
        pass
