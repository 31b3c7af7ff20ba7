"""The unlearning loop: one screen, top to bottom.

    for each epoch:
        method.before_epoch(...)              e.g. SCRUB's max-steps on D_u
        for each retain batch (device-resident, shuffled):
            loss = step_loss(...):
                x1 = t(x)                     per-sample crop/flip
                z1 = features(x1); logits = classifier(z1)
                loss = method.loss(...)       e.g. CE for FT
                if cl_weight > 0:             the CL plug-in, for any method
                    x2 = t'(x); z2 = features(x2)
                    loss += cl_weight * contrastive_loss(z1, z2, temperature)
            backward; method.before_step      e.g. SalUn masks gradients
            SGD step (momentum 0.9, wd 5e-4), cosine lr step; method.after_step
        evaluate; report metrics (+ a checkpoint) to the caller

The optimiser recipe is shared by every method so that comparisons differ only in the method.
The cosine schedule runs per step from `lr` to 1e-4 over all `epochs`, so a 1-epoch run
anneals too. A run resumed from an epoch checkpoint ends bit-identical (CPU) to an
uninterrupted one: the checkpoint holds model, optimiser, scheduler, method and RNG state.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection

import numpy as np
import torch

from coun_tune.core.batching import Augmenter, DeviceSplit, shuffled_batches, steps_per_epoch
from coun_tune.core.datasets import DatasetArrays
from coun_tune.core.losses import contrastive_loss
from coun_tune.core.methods import ForgetGuard, Method, MethodContext, RetainStep, get_method, method_hparams
from coun_tune.core.metrics import evaluate, gaps
from coun_tune.core.models import FeatureClassifier, count_forward_macs
from coun_tune.core.splits import Split
from coun_tune.errors import UsageError

MOMENTUM, WEIGHT_DECAY, FINAL_LR = 0.9, 5e-4, 1e-4


class DivergedError(RuntimeError):
    """The loss became NaN or infinite: the trial ends as failed with this reason."""


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
    def build(cls, data: DatasetArrays, split: Split, device: torch.device | str) -> "ScenarioData":
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


def evaluate_scenario(model: torch.nn.Module, scenario: ScenarioData, seed: int,
                      oracle_metrics: dict[str, float] | None = None, with_mia: bool = True) -> dict[str, float]:
    """A model's metrics on a scenario's splits, with its gaps to the oracle when given."""
    metrics = evaluate(model, scenario.retain, scenario.forget, scenario.test, scenario.augmenter, seed, with_mia)
    if oracle_metrics is not None:
        metrics.update(gaps(metrics, oracle_metrics))
    return metrics


def resolve_hparams(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and values checked; raises UsageError naming the bad one."""
    declared = method_hparams(method)
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise UsageError(f"method {method!r} has no hyperparameter {unknown[0]!r}; it has {', '.join(sorted(declared))}")
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
    if out["lr"] <= FINAL_LR:  # the cosine schedule ends at FINAL_LR: a smaller lr would rise
        raise UsageError(f"lr must be > {FINAL_LR:g} (the cosine schedule's floor), got {out['lr']:g}")
    if out["epochs"] < 1:
        raise UsageError(f"epochs must be >= 1, got {out['epochs']}")
    return out


def flops_per_retain_sample(model: FeatureClassifier, image_shape: tuple[int, int, int], cl_on: bool,
                            uses_retain_step: bool = True) -> int:
    """FLOPs counted like the paper: FLOPs = 2 x MACs; a training pass is forward + backward
    = 3 forwards; with the CL plug-in both views go forward and backward (6 forwards); a
    method that ignores the retain batch (GA) spends none on it without the plug-in."""
    passes = 6 if cl_on else (3 if uses_retain_step else 0)
    return 2 * count_forward_macs(model, image_shape) * passes


def step_loss(method: Method, ctx: MethodContext, x: torch.Tensor, y: torch.Tensor, epoch: int, step_i: int,
              cl_weight: float, tau: float) -> torch.Tensor:
    """The loss of one step on a retain batch x (N, C, H, W) uint8, y (N,): the method's loss
    on view 1 plus, when the plug-in is on, cl_weight * L_CL(z1, z2). The loop and the tests
    call this one function. Draws from ctx.generator in this order: view 1, the method's
    own draws, view 2; so turning the plug-in on changes nothing before view 2."""
    x1 = ctx.augmenter(x, ctx.generator)  # drawn even when unused: the RNG stream stays the same
    if not method.uses_retain_step and cl_weight == 0:
        return method.loss(ctx, None)  # e.g. GA: no retain forward, batch norm sees only D_u
    z1 = ctx.model.features(x1)
    step = RetainStep(x1=x1, y=y, z1=z1, logits=ctx.model.classifier(z1), epoch=epoch, step=step_i)
    loss = method.loss(ctx, step)
    if cl_weight > 0:
        z2 = ctx.model.features(ctx.augmenter(x, ctx.generator))
        loss = loss + cl_weight * contrastive_loss(z1, z2, tau)
    return loss


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
) -> dict[str, float]:
    """Unlearn in place: `model` starts as theta_o (or from `resume`) and ends as theta_u.

    hparams: lr, epochs, temperature, cl_weight and the method's own (see resolve_hparams).
    on_epoch(epoch, metrics, make_checkpoint) is called after every epoch (1-based);
    make_checkpoint() returns a dict of tensors/ints that `resume=` accepts.
    mia_every: compute the (costly) SVC MIA every k epochs; 0 = only after the last epoch.
    mia_epochs: epochs (1-based) that compute it too (a search's early-stopping rungs).
    Returns the final epoch's metrics (with gaps if oracle_metrics is given).
    """
    hp = resolve_hparams(method_name, hparams)
    method = get_method(method_name)
    device = scenario.retain.x.device
    epochs, cl_weight, tau = hp["epochs"], hp["cl_weight"], hp["temperature"]
    steps = steps_per_epoch(len(scenario.retain), batch_size)
    if steps == 0:
        raise UsageError(f"the retain set ({len(scenario.retain)} samples) is too small for one batch")
    generator = torch.Generator(device=device).manual_seed(seed)
    original = copy.deepcopy(original).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    ctx = MethodContext(
        model=model, original=original, retain=scenario.retain,
        forget=scenario.forget if method.reads_forget else ForgetGuard(method.name),
        augmenter=scenario.augmenter, num_classes=scenario.num_classes, batch_size=batch_size,
        epochs=epochs, steps_per_epoch=steps, generator=generator, hparams=hp, optimizer=optimizer,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps, eta_min=FINAL_LR)
    method.prepare(ctx)
    start_epoch, wall = 0, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"].cpu())  # set_state takes a CPU ByteTensor, CUDA generators too
        method.load_state_dict(resume.get("method", {}))
        start_epoch, wall = int(resume["epoch"]), float(resume["wall_seconds"])
    flops_per_sample = flops_per_retain_sample(model, scenario.image_shape, cl_weight > 0, method.uses_retain_step)
    flops_per_forward = 2 * count_forward_macs(model, scenario.image_shape)  # a method's extra passes

    def flops_after(n_epochs: int) -> float:
        extra = sum(method.extra_forwards(ctx, e) for e in range(n_epochs))
        return float(flops_per_sample * len(scenario.retain) * n_epochs + flops_per_forward * extra)
    metrics: dict[str, float] = {}

    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        model.train()
        method.before_epoch(ctx, epoch)
        for step_i, idx in enumerate(shuffled_batches(len(scenario.retain), batch_size, generator, device)):
            loss = step_loss(method, ctx, scenario.retain.x[idx], scenario.retain.y[idx], epoch, step_i, cl_weight, tau)
            if not torch.isfinite(loss):
                raise DivergedError(f"loss is {loss.item()} at epoch {epoch + 1}, step {step_i + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.before_step(ctx)
            optimizer.step()
            scheduler.step()
            method.after_step(ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall += time.perf_counter() - t0  # training time only: evaluation is not unlearning cost

        last = epoch + 1 == epochs
        with_mia = last or (mia_every > 0 and (epoch + 1) % mia_every == 0) or epoch + 1 in mia_epochs
        metrics = evaluate_scenario(model, scenario, seed, oracle_metrics, with_mia)
        metrics["epoch"] = epoch + 1
        metrics["wall_seconds"] = wall
        metrics["flops"] = flops_after(epoch + 1)
        metrics["loss"] = float(loss.item())
        if on_epoch is not None:
            def make_checkpoint(e: int = epoch + 1, w: float = wall) -> dict:
                return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                        "method": method.state_dict(), "epoch": e, "wall_seconds": w}
            on_epoch(epoch + 1, metrics, make_checkpoint)
    if not metrics:  # resumed from the last epoch's checkpoint: nothing left to train
        metrics = evaluate_scenario(model, scenario, seed, oracle_metrics)
        metrics.update(epoch=epochs, wall_seconds=wall, flops=flops_after(epochs))
    return metrics
