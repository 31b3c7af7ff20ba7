"""The unlearning loop: one screen, top to bottom.

    for each epoch:
        for each batch of method.epoch_batches(...)   retain batches by default; GA: forget
                                                      batches; RL: D_u (random labels) + D_r
            loss = step_loss(...):
                x1 = t(x)                     per-sample crop/flip
                z1 = features(x1); logits = classifier(z1)
                loss = method.loss(...)       e.g. CE for FT
                if cl_weight > 0:             the CL plug-in, for any method, on retain rows
                    x2 = t'(x_r); z2 = features(x2)
                    loss += cl_weight * contrastive_loss(z1_r, z2, temperature)
            backward; method.before_step      e.g. SalUn masks gradients
            SGD step (momentum 0.9, wd 5e-4), cosine lr step; method.after_step
        evaluate; report metrics (+ a checkpoint) to the caller

The optimiser recipe is shared by every method so that comparisons differ only in the method.
The cosine schedule runs per step from `lr` to cosine_floor(lr) over all the steps of the run
(the sum of every epoch's plan), so a 1-epoch run anneals too. A run resumed from an epoch
checkpoint ends bit-identical (CPU) to an uninterrupted one: the checkpoint holds model,
optimiser, scheduler, method, work count and RNG state. How the loop runs on its device is
fastpath.FastPath: on CUDA by default channels_last, bf16 autocast (the contrastive term in
fp32) and one NaN check per epoch; on a CPU by default exactly the loop above.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from coun_tune.core.batching import Augmenter, DeviceSplit
from coun_tune.core.datasets import DatasetArrays
from coun_tune.core.fastpath import FastPath, NonFiniteWatch, compiled_features, fused_features
from coun_tune.core.losses import contrastive_loss
from coun_tune.core.methods import Batch, ForgetGuard, Method, MethodContext, Step, get_method, method_hparams
from coun_tune.core.metrics import evaluate, flops_from_work, gaps, member_seed
from coun_tune.core.models import FeatureClassifier, count_forward_macs
from coun_tune.core.splits import Split
from coun_tune.errors import DivergedError, UsageError

__all__ = [
    "DivergedError",
    "ScenarioData",
    "evaluate_scenario",
    "resolve_hparams",
    "cosine_floor",
    "step_loss",
    "run_unlearning",
    "unlearning_epochs",
    "EpochReport",
]

MOMENTUM, WEIGHT_DECAY, FINAL_LR = 0.9, 5e-4, 1e-4


def cosine_floor(lr: float) -> float:
    """Where the cosine schedule ends: the paper's 1e-4 for its lr range [0.01, 0.1] (a 100x to
    1000x decay), and lr / 100 below lr = 0.01, so a method searched at small learning rates
    (GA: 1e-5..1e-3) still anneals by 100x instead of *rising* towards 1e-4."""
    return min(FINAL_LR, lr / 100.0)


@dataclass
class ScenarioData:
    """A scenario's three splits on the training device, and its test-time transform."""

    retain: DeviceSplit
    forget: DeviceSplit
    test: DeviceSplit
    augmenter: Augmenter
    num_classes: int
    image_shape: tuple[int, int, int]
    split_hash: str

    @classmethod
    def build(cls, data: DatasetArrays, split: Split, device: torch.device | str) -> ScenarioData:
        def put(x: np.ndarray, y: np.ndarray) -> DeviceSplit:
            return DeviceSplit(torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(y).to(device))

        return cls(
            retain=put(data.train_x[split.retain_idx], data.train_y[split.retain_idx]),
            forget=put(data.train_x[split.forget_idx], data.train_y[split.forget_idx]),
            test=put(data.test_x[split.test_idx], data.test_y[split.test_idx]),
            augmenter=Augmenter(data.augment, device),
            num_classes=data.num_classes,
            image_shape=data.image_shape,
            split_hash=split.split_hash,
        )


def evaluate_scenario(
    model: torch.nn.Module,
    scenario: ScenarioData,
    oracle_metrics: dict[str, float] | None = None,
    with_mia: bool = True,
) -> dict[str, float]:
    """A model's metrics on a scenario's splits, with its gaps to the oracle when given. The
    MIA's member sample is drawn from the split (member_seed(split_hash)), never from a run's
    seed: the original, the oracle, every unlearned model and every noise-floor oracle of one
    split are scored against the same members."""
    metrics = evaluate(
        model,
        scenario.retain,
        scenario.forget,
        scenario.test,
        scenario.augmenter,
        member_seed(scenario.split_hash),
        with_mia,
    )
    if oracle_metrics is not None:
        metrics.update(gaps(metrics, oracle_metrics))
    return metrics


def resolve_hparams(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and values checked; raises UsageError naming the bad one."""
    declared = method_hparams(method)
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise UsageError(
            f"method {method!r} has no hyperparameter {unknown[0]!r}; it has {', '.join(sorted(declared))}"
        )
    out: dict[str, Any] = {}
    for name, h in declared.items():
        v = given.get(name, h.default)
        if v is None:
            v = h.default
        try:
            v = int(v) if h.kind == "int" else float(v)
        except (TypeError, ValueError):
            raise UsageError(f"{name} must be a number, got {v!r}") from None
        if not math.isfinite(v):
            raise UsageError(f"{name} must be finite, got {v}")
        if not h.valid[0] <= v <= h.valid[1]:
            raise UsageError(f"{name} must be in [{h.valid[0]:g}, {h.valid[1]:g}], got {v:g}")
        out[name] = v
    if out["temperature"] <= 0:
        raise UsageError(f"temperature must be > 0, got {out['temperature']:g}")
    if out["cl_weight"] < 0:
        raise UsageError(f"cl_weight must be >= 0, got {out['cl_weight']:g}")
    if out["lr"] <= 0:
        raise UsageError(f"lr must be > 0, got {out['lr']:g}")
    if out["epochs"] < 1:
        raise UsageError(f"epochs must be >= 1, got {out['epochs']}")
    return out


def step_loss(
    method: Method,
    ctx: MethodContext,
    batch: Batch,
    epoch: int,
    step_i: int,
    cl_weight: float,
    tau: float,
    fused_views: bool = False,
) -> torch.Tensor:
    """The loss of one step on a batch (x (N, C, H, W) uint8, y (N,), forget rows): the
    method's loss on view 1 plus, when the plug-in is on, cl_weight * L_CL(z1, z2) over the
    batch's retain rows (none: no term, e.g. SCRUB's max steps). The loop and the tests call
    this one function. Draws from ctx.generator in this order: view 1, the method's own
    draws, view 2; so turning the plug-in on changes nothing before view 2. Counts the rows
    it trains on in ctx.work, and their second views (ctx.work["views"]: flops' convention)."""
    x1 = ctx.augmenter(batch.x, ctx.generator)
    z2 = None
    if fused_views and cl_weight > 0 and batch.forget is None and len(batch) >= 2:
        # FastPath.fused_views: view 2 drawn before the method's own draws, one forward of 2N
        z1, z2 = fused_features(ctx.model, x1, ctx.augmenter(batch.x, ctx.generator))
    else:
        z1 = ctx.model.features(x1)
    step = Step(
        x1=x1,
        y=batch.y,
        z1=z1,
        logits=ctx.model.classifier(z1),
        epoch=epoch,
        step=step_i,
        forget=batch.forget,
        phase=batch.phase,
    )
    ctx.count(trained=len(batch))
    loss = method.loss(ctx, step)
    if cl_weight > 0:
        x_r, z1_r = batch.x, z1
        if batch.forget is not None:  # a mixed batch: the plug-in sees its retain rows only
            x_r, z1_r = batch.x[~batch.forget], z1[~batch.forget]
        if len(x_r) >= 2:  # one positive and at least one negative
            if z2 is None:
                z2 = ctx.model.features(ctx.augmenter(x_r, ctx.generator))
            ctx.count(views=len(x_r))  # a second view of rows counted above: flops +1, flops_true +3
            loss = loss + cl_weight * contrastive_loss(z1_r, z2, tau)
    return loss


@dataclass
class EpochReport:
    """What one epoch of unlearning_epochs hands back: the epoch (1-based), the model's metrics
    after it, and make_checkpoint() -> the dict `resume=` accepts (None for the report of a run
    resumed after its last epoch, which trained nothing)."""

    epoch: int
    metrics: dict[str, float]
    make_checkpoint: Callable[[], dict] | None


def run_unlearning(
    model: FeatureClassifier,
    original: FeatureClassifier,
    scenario: ScenarioData,
    method_name: str,
    hparams: dict[str, Any],
    batch_size: int,
    seed: int,
    oracle_metrics: dict[str, float] | None = None,
    on_epoch: Callable[[int, dict[str, float], Callable[[], dict]], None] | None = None,
    resume: dict | None = None,
    mia_every: int = 0,
    mia_epochs: Collection[int] = (),
    fast_path: FastPath | None = None,
) -> dict[str, float]:
    """Unlearn in place: `model` starts as theta_o (or from `resume`) and ends as theta_u.

    hparams: lr, epochs, temperature, cl_weight and the method's own (see resolve_hparams).
    on_epoch(epoch, metrics, make_checkpoint) is called after every epoch (1-based);
    make_checkpoint() returns a dict of tensors/ints that `resume=` accepts.
    mia_every: compute the (costly) SVC MIA every k epochs; 0 = only after the last epoch.
    mia_epochs: epochs (1-based) that compute it too (a search's early-stopping rungs).
    fast_path: how the loop runs on its device (see fastpath.py); None = FastPath(): on CUDA
    channels_last, bf16 autocast, one NaN check per epoch; on CPU the plain loop.
    Returns the final epoch's metrics (with gaps if oracle_metrics is given).
    """
    metrics: dict[str, float] = {}
    run = unlearning_epochs(
        model,
        original,
        scenario,
        method_name,
        hparams,
        batch_size,
        seed,
        oracle_metrics=oracle_metrics,
        resume=resume,
        mia_every=mia_every,
        mia_epochs=mia_epochs,
        fast_path=fast_path,
    )
    for report in run:
        metrics = report.metrics
        if on_epoch is not None and report.make_checkpoint is not None:
            on_epoch(report.epoch, report.metrics, report.make_checkpoint)
    return metrics


def unlearning_epochs(
    model: FeatureClassifier,
    original: FeatureClassifier,
    scenario: ScenarioData,
    method_name: str,
    hparams: dict[str, Any],
    batch_size: int,
    seed: int,
    oracle_metrics: dict[str, float] | None = None,
    resume: dict | None = None,
    mia_every: int = 0,
    mia_epochs: Collection[int] = (),
    fast_path: FastPath | None = None,
) -> Iterator[EpochReport]:
    """run_unlearning as a generator: trains one epoch per next() and yields its EpochReport.
    A trial calibrated on several forget sets advances one generator per split in lock step,
    so it can report the mean over the splits after every epoch (the scheduler's rungs need
    per-epoch reports). Arguments as run_unlearning's."""
    hp = resolve_hparams(method_name, hparams)
    method = get_method(method_name)
    device = scenario.retain.x.device
    fast = (fast_path or FastPath()).resolve(device)
    epochs, cl_weight, tau = hp["epochs"], hp["cl_weight"], hp["temperature"]
    generator = torch.Generator(device=device).manual_seed(seed)
    original = copy.deepcopy(original).eval().requires_grad_(False)
    fast.prepare(device, model, original)
    optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    ctx = MethodContext(
        model=model,
        original=original,
        retain=scenario.retain,
        forget=scenario.forget if method.reads_forget else ForgetGuard(method.name),
        augmenter=scenario.augmenter,
        num_classes=scenario.num_classes,
        batch_size=batch_size,
        epochs=epochs,
        generator=generator,
        hparams=hp,
        optimizer=optimizer,
    )
    method.prepare(ctx)
    steps = [method.steps_in_epoch(ctx, e) for e in range(epochs)]  # the plan, without drawing
    if min(steps) == 0:
        raise UsageError(
            f"method {method_name!r} has no step in an epoch: the retain set ({len(scenario.retain)}) or "
            f"forget set is too small for one batch of {batch_size}"
        )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=sum(steps), eta_min=cosine_floor(hp["lr"]))
    start_epoch, wall = 0, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"].cpu())  # set_state takes a CPU ByteTensor, CUDA generators too
        method.load_state_dict(resume.get("method", {}))
        ctx.work = {k: int(v) for k, v in resume["work"].items()}
        start_epoch, wall = int(resume["epoch"]), float(resume["wall_seconds"])
    forward_macs = count_forward_macs(model, scenario.image_shape)
    metrics: dict[str, float] = {}

    watch, compiled = NonFiniteWatch(fast.check_every), {}  # compiled: torch.compile's cache for the run
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        model.train()
        step_i = -1
        watch.reset()
        with compiled_features(model, fast.compile, compiled):
            for step_i, batch in enumerate(method.epoch_batches(ctx, epoch)):
                with fast.autocast(device):
                    loss = step_loss(method, ctx, batch, epoch, step_i, cl_weight, tau, fast.fused_views)
                watch.observe(loss, step_i)  # NaN/inf: DivergedError naming the epoch and first bad step
                if watch.due(step_i):
                    watch.raise_if_bad(epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                method.before_step(ctx)
                optimizer.step()
                scheduler.step()
                method.after_step(ctx)
        watch.raise_if_bad(epoch)
        if step_i + 1 != steps[epoch]:  # the cosine schedule was sized from steps_in_epoch
            raise RuntimeError(f"{method_name}: epoch {epoch + 1} took {step_i + 1} steps, planned {steps[epoch]}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall += time.perf_counter() - t0  # training time only: evaluation is not unlearning cost

        last = epoch + 1 == epochs
        with_mia = last or (mia_every > 0 and (epoch + 1) % mia_every == 0) or epoch + 1 in mia_epochs
        metrics = evaluate_scenario(model, scenario, oracle_metrics, with_mia)
        metrics.update(epoch=epoch + 1, wall_seconds=wall, **flops_from_work(ctx.work, forward_macs))
        metrics["loss"] = float(loss.item())

        def make_checkpoint(e: int = epoch + 1, w: float = wall, work: tuple = tuple(ctx.work.items())) -> dict:
            return {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "method": method.state_dict(),
                "work": dict(work),
                "epoch": e,
                "wall_seconds": w,
            }

        yield EpochReport(epoch + 1, metrics, make_checkpoint)
    if not metrics:  # resumed from the last epoch's checkpoint: nothing left to train
        metrics = evaluate_scenario(model, scenario, oracle_metrics)
        metrics.update(epoch=epochs, wall_seconds=wall, **flops_from_work(ctx.work, forward_macs))
        yield EpochReport(epochs, metrics, None)
