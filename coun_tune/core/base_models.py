"""The original (theta_o, trained on D = D_r + D_u) and the oracle (theta_r, trained on D_r
only), trained with the scenario's recipe and cached by a hash of everything that determines
them, together with their metrics.

Cache layout: <cache_dir>/models/<key>/{model.pt, meta.json}; meta.json holds the sha256 of
model.pt (checked on every load), the key's inputs, the training wall time and the model's
metrics on each split it has been evaluated on (keyed by split hash and metric-code version,
`metrics_key`).
A second run on the same scenario trains nothing and says so.

cache_dir is a local/NFS path or s3://bucket/prefix (read and written through storage.py). On
a cluster the base models are trained once (by a Ray task) and every trial, on any node, reads
the same bytes: the weights are read straight into memory and checksummed there, with no local
copy (a copy would need its own invalidation, and a trial reads each model once).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from coun_tune.core import storage
from coun_tune.core.batching import shuffled_batches
from coun_tune.core.datasets import DatasetArrays
from coun_tune.core.engine import ScenarioData, evaluate_scenario
from coun_tune.core.metrics import METRICS_CODE_VERSION, gaps
from coun_tune.core.models import FeatureClassifier, build_model
from coun_tune.core.recipes import Scenario, TrainRecipe
from coun_tune.core.splits import Split
from coun_tune.errors import UsageError

ROLES = ("original", "oracle")
CACHE_FORMAT = 2


def default_cache_dir() -> Path | str:
    """$COUN_TUNE_CACHE, else ~/.cache/coun-tune. On a cluster point it at shared storage
    (cache_dir: s3://bucket/prefix in the spec, or a filesystem mounted on every node).
    An s3:// value comes back as the URI string (Path() would fold its `//`)."""
    env = os.environ.get("COUN_TUNE_CACHE")
    if env and storage.is_remote(env):
        return env
    return Path(env or Path.home() / ".cache" / "coun-tune")


# --- resumable training ------------------------------------------------------------------------
# Base models train for hours on spot workers: the training state is saved to the cache entry
# (beside where model.pt will go, so a local path or s3:// alike) at the end of an epoch once
# CHECKPOINT_EVERY_ENV seconds (default 60) have passed since the last save, and a retried task
# on any node resumes from it. The state is everything the next epoch depends on (weights and
# BN statistics, SGD momentum, the LR schedule, the batch/augmentation generator and torch's
# global RNG), so a resumed run ends with the same weights as an uninterrupted one on the
# same device type and thread count. Removed once the finished model is cached.
CHECKPOINT_NAME = "training_checkpoint.pt"
CHECKPOINT_EVERY_ENV = "COUN_TUNE_BASE_CHECKPOINT_S"
DEFAULT_CHECKPOINT_EVERY_S = 60.0
# Test hook: seconds slept after each epoch, so a test can preempt training mid-way.
TEST_EPOCH_DELAY_ENV = "COUN_TUNE_TEST_EPOCH_DELAY_S"


def checkpoint_every_s() -> float:
    """Seconds between training checkpoints ($COUN_TUNE_BASE_CHECKPOINT_S; 0 = every epoch)."""
    raw = os.environ.get(CHECKPOINT_EVERY_ENV, "")
    try:
        return max(0.0, float(raw)) if raw.strip() else DEFAULT_CHECKPOINT_EVERY_S
    except ValueError:
        raise UsageError(f"{CHECKPOINT_EVERY_ENV}={raw!r}: seconds between checkpoints, a number >= 0") from None


def _save_training_state(uri: str, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(uri, buf.getvalue())  # atomic: a preemption mid-write leaves the previous one


def _load_training_state(uri: str, device: torch.device, epochs: int, log: Callable[[str], None]) -> dict | None:
    """The saved training state if there is a usable one, else None (with a line saying why
    when one exists but cannot be used)."""
    try:
        blob = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    try:
        state = torch.load(io.BytesIO(blob), map_location=device, weights_only=True)
        ok = isinstance(state, dict) and 0 < int(state["epoch"]) < epochs and int(state["epochs"]) == epochs
    except Exception as e:  # a torn or foreign file: train from scratch rather than fail
        log(f"ignoring the training checkpoint {uri} ({type(e).__name__}); training from epoch 0")
        return None
    if not ok:
        return None
    if state.get("device") != device.type:  # a CUDA generator state does not load into a CPU one
        log(f"ignoring the training checkpoint {uri}: saved on {state.get('device')}, training on {device.type}")
        return None
    return state


def train_from_scratch(
    model: FeatureClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    augmenter,
    recipe: TrainRecipe,
    seed: int,
    role: str,
    log: Callable[[str], None] = lambda s: None,
    checkpoint: str | None = None,
) -> float:
    """Train `model` in place on x (N, C, H, W) uint8 / y (N,) with cross-entropy, CHN
    augmentation, SGD and step decay. Returns the wall seconds (over every attempt, when
    resumed). The original gets the whole training split in its stored order (so it is the
    same model whatever is forgotten later); the oracle gets D_r. `log` gets one line per
    epoch: role, epoch k/N, mean loss, train accuracy (on the augmented batches, as trained),
    seconds per epoch and the time left. `checkpoint`: a file URI (local or s3://) where the
    training state is saved between epochs and resumed from (see CHECKPOINT_NAME)."""
    device = x.device
    generator = torch.Generator(device=device).manual_seed(seed + (0 if role == "original" else 1))
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    milestones = [int(round(f * recipe.epochs)) for f in recipe.milestones]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=recipe.gamma)
    start, before = 0, 0.0
    saved = _load_training_state(checkpoint, device, recipe.epochs, log) if checkpoint else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict({**saved["scheduler"], "milestones": Counter(saved["scheduler"]["milestones"])})
        generator.set_state(saved["generator"].cpu())
        torch.set_rng_state(saved["torch_rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in saved:
            torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)
        start, before = int(saved["epoch"]), float(saved["elapsed"])
        log(f"{role}: resuming from the checkpoint of epoch {start}/{recipe.epochs} ({checkpoint})")
        del saved
    every, delay = checkpoint_every_s(), float(os.environ.get(TEST_EPOCH_DELAY_ENV) or 0)
    t0 = time.perf_counter() - before
    last_save = time.perf_counter()
    model.train()
    for epoch in range(start, recipe.epochs):
        # summed on the device, read once per epoch: a .item() per batch would sync a GPU
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        for idx in shuffled_batches(len(y), recipe.batch_size, generator, device):
            logits = model(augmenter(x[idx], generator))
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == y[idx]).sum()
        sched.step()
        loss_mean, acc = loss_sum.item() / len(y), 100.0 * correct.item() / len(y)
        if delay:
            time.sleep(delay)
        done = epoch + 1
        # saved before the epoch's line is logged: a line "epoch k" means epoch k is safe
        if checkpoint and done < recipe.epochs and time.perf_counter() - last_save >= every:
            sched_state = sched.state_dict()
            state = {
                "epoch": done,
                "epochs": recipe.epochs,
                "elapsed": time.perf_counter() - t0,
                "device": device.type,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                # MultiStepLR keeps its milestones in a Counter, which weights_only loading refuses
                "scheduler": {**sched_state, "milestones": dict(sched_state["milestones"])},
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
            }
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(device)
            _save_training_state(checkpoint, state)
            last_save = time.perf_counter()
        log(epoch_line(role, done, recipe.epochs, loss_mean, acc, time.perf_counter() - t0))
    return time.perf_counter() - t0


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def epoch_line(role: str, epoch: int, epochs: int, loss: float, train_acc: float, elapsed: float) -> str:
    """One progress line: `original: epoch 3/30  loss 0.4123  train_acc 87.21%  12.3 s/epoch  ETA 5m32s`.
    elapsed: wall seconds of training so far (of every attempt, when resumed); the ETA assumes
    the mean epoch so far."""
    per_epoch = elapsed / epoch
    return (
        f"{role}: epoch {epoch}/{epochs}  loss {loss:.4f}  train_acc {train_acc:.2f}%  "
        f"{per_epoch:.1f} s/epoch  ETA {_duration(per_epoch * (epochs - epoch))}"
    )


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


# Bump when train_from_scratch (or anything it calls: augmentation, batching, init) changes
# what a given recipe produces: every cached original and oracle is then retrained.
TRAINING_CODE_VERSION = 2


def cache_key(data: DatasetArrays, split: Split, scenario: Scenario, role: str) -> tuple[str, dict]:
    """Hash of everything that determines a base model's weights (and of the code that trains
    it, TRAINING_CODE_VERSION). The original depends on the dataset and its augmentation
    policy, not on what will be forgotten (it trains on all of D), so every forget spec and
    every sequential request share one; the oracle depends on the split (its D_r)."""
    from dataclasses import asdict

    inputs = {
        "format": CACHE_FORMAT,
        "training_code": TRAINING_CODE_VERSION,
        "role": role,
        "dataset": data.name,
        "augment": asdict(data.augment),
        "arch": scenario.arch_name,
        "recipe": scenario.train_recipe.to_dict(),
        "seed": scenario.seed,
    }
    inputs["data" if role == "original" else "split_hash"] = (
        data.fingerprint() if role == "original" else split.split_hash
    )
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24], inputs


def metrics_key(split_hash: str) -> str:
    """The key of a model's cached metrics on one split: the split hash and the metric code's
    version (metrics.METRICS_CODE_VERSION), so metrics computed by older code are not reused."""
    return f"{split_hash}:metrics-v{METRICS_CODE_VERSION}"


def load_cached(entry: str | Path) -> tuple[dict, dict] | None:
    """(state_dict, meta) if the entry exists and its checksum holds, else None. A checksum
    mismatch is an error, not a silent retrain: the file was corrupted or tampered with.
    `entry` is a local path or s3://...; the bytes checked are the bytes loaded."""
    meta_path, model_path = storage.join(str(entry), "meta.json"), storage.join(str(entry), "model.pt")
    try:
        meta_bytes, blob = storage.read_bytes(meta_path), storage.read_bytes(model_path)
    except FileNotFoundError:  # meta.json is written last: without it the entry is not complete
        return None
    try:
        meta = json.loads(meta_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(
            f"cache entry {str(entry)!r} has a corrupted meta.json: delete the folder to retrain"
        ) from None
    if not isinstance(meta, dict) or _sha256(blob) != meta.get("sha256"):
        raise UsageError(f"cached model {model_path!r} fails its checksum: delete {str(entry)!r} to retrain")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True), meta


def _write_json(entry: str, meta: dict) -> None:
    storage.write_bytes(storage.join(entry, "meta.json"), json.dumps(meta, indent=2).encode())


@dataclass
class BaseModels:
    original: FeatureClassifier
    oracle: FeatureClassifier
    original_metrics: dict[str, float]
    oracle_metrics: dict[str, float]
    from_cache: dict[str, bool]
    cache_entries: dict[str, Path | str]  # a Path for a local cache, the s3:// URI otherwise


def ensure_base_models(
    data: DatasetArrays,
    split: Split,
    scenario: Scenario,
    scen_data: ScenarioData,
    cache_dir: str | Path,
    log: Callable[[str], None] = print,
    roles: tuple[str, ...] = ROLES,
    train_missing: bool = True,
) -> BaseModels:
    """Load theta_o and theta_r from the cache, training (and caching) whichever is missing.
    Each model's metrics on a split are computed once and cached. A search trial passes
    train_missing=False: the driver made sure they exist, and a trial that cannot see them is
    on a node without the shared cache, where retraining would measure against another oracle."""
    device = scen_data.retain.x.device
    in_ch = data.image_shape[0]
    models, metrics, from_cache, entries = {}, {}, {}, {}
    for role in roles:
        key, inputs = cache_key(data, split, scenario, role)
        entry = storage.join(str(cache_dir), "models", key)
        entries[role] = entry if storage.is_remote(entry) else Path(entry)
        model = build_model(scenario.arch_name, in_ch, data.num_classes).to(device)
        cached = load_cached(entry)
        if cached is not None:
            state, meta = cached
            model.load_state_dict(state)
            from_cache[role] = True
            log(f"{role}: loaded from cache {entry}")
        elif not train_missing:
            raise RuntimeError(
                f"{role} model missing from the cache at {entry}: on a cluster, cache_dir must be "
                "s3://bucket/prefix or shared storage mounted at the same path on every node"
            )
        else:
            log(
                f"{role}: training {scenario.arch_name} with recipe {scenario.recipe_name!r} "
                f"({scenario.train_recipe.epochs} epochs)"
            )
            if role == "original":
                x, y = (torch.from_numpy(a).to(device) for a in (data.train_x, data.train_y))
            else:
                x, y = scen_data.retain.x, scen_data.retain.y
            torch.manual_seed(scenario.seed)  # the same init for theta_o and theta_r
            ckpt = storage.join(entry, CHECKPOINT_NAME)  # resumed from after a preemption
            model = build_model(scenario.arch_name, in_ch, data.num_classes).to(device)
            seconds = train_from_scratch(
                model, x, y, scen_data.augmenter, scenario.train_recipe, scenario.seed, role, log, ckpt
            )
            del x, y
            buf = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
            blob = buf.getvalue()
            # atomic writes (storage.write_bytes): concurrent runs may share a cache; model.pt
            # first, meta.json (with its checksum) last, so an entry is complete once it has one
            storage.write_bytes(storage.join(entry, "model.pt"), blob)
            meta = {"sha256": _sha256(blob), "key_inputs": inputs, "wall_seconds": seconds, "metrics_by_split": {}}
            from_cache[role] = False
            log(f"{role}: trained in {seconds:.1f}s, cached at {entry}")
        # Metrics depend on the split (which samples are D_u, which test samples count) and on
        # the metric code: cached beside the weights under metrics_key(split), computed once
        # per split and METRICS_CODE_VERSION (a change of the metric code recomputes them).
        by_split = meta.setdefault("metrics_by_split", {})
        mkey = metrics_key(split.split_hash)
        if mkey not in by_split:
            model.eval()
            m = evaluate_scenario(model, scen_data)  # MIA members drawn from the split
            m["wall_seconds"] = meta.get("wall_seconds", 0.0)
            by_split[mkey] = m
            _write_json(entry, meta)
        if not from_cache[role]:  # the entry is complete: its training checkpoint is superseded
            storage.remove_tree(storage.join(entry, CHECKPOINT_NAME))
        metrics[role] = by_split[mkey]
        models[role] = model.eval()
    if "original" in metrics and "oracle" in metrics:
        metrics["original"] = {**metrics["original"], **gaps(metrics["original"], metrics["oracle"])}
        orig_train_acc = metrics["original"]["retain_acc"]
        if orig_train_acc < 99.0:
            log(
                f"warning: the original reaches only {orig_train_acc:.1f}% retain accuracy; below 99% it has not "
                "memorized its data and there is little to unlearn (METHOD.md section 5)"
            )
    return BaseModels(
        models.get("original"),
        models.get("oracle"),
        metrics.get("original", {}),
        metrics.get("oracle", {}),
        from_cache,
        entries,
    )


def oracle_seed_spread(
    data: DatasetArrays,
    split: Split,
    scenario: Scenario,
    scen_data: ScenarioData,
    cache_dir: str | Path,
    oracle_metrics: dict[str, float],
    n_seeds: int,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """The noise floor of every gap: oracles retrained on the same D_r with other seeds
    (scenario.seed + 1 ... + n_seeds - 1, cached like any oracle), and their gaps to the
    scenario's oracle. Returns the mean of each gap over those seeds, as `oracle_noise_<gap>`
    (e.g. oracle_noise_avg_gap): an unlearned model whose gap is below this is as close to
    the oracle as another retraining would be (METHOD.md sections 5 and 7)."""
    if n_seeds < 2:
        return {}
    from dataclasses import replace

    per_seed = []
    for k in range(1, n_seeds):
        other = replace(scenario, seed=scenario.seed + k)
        base = ensure_base_models(data, split, other, scen_data, cache_dir, log, roles=("oracle",))
        per_seed.append(gaps(base.oracle_metrics, oracle_metrics))
    out = {f"oracle_noise_{g}": float(np.mean([p[g] for p in per_seed])) for g in per_seed[0]}
    out["oracle_noise_seeds"] = float(n_seeds - 1)
    return out
