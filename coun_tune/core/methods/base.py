"""What an unlearning method is, to the engine.

A method says what one epoch iterates over (`epoch_batches`: retain batches by default; GA:
forget batches; RL and Bad Teacher: one shuffled loader mixing D_u with D_r) and the loss of
one optimiser step on such a batch. The engine owns everything else: the optimiser recipe
shared by all methods (SGD, momentum 0.9, weight decay 5e-4, cosine schedule over all the
steps of the run), augmentation, the CL plug-in (`cl_weight` > 0 adds `cl_weight *
contrastive_loss` on a second view of the batch's *retain* rows, for any method), evaluation,
the work count behind `flops`, and checkpoints.

A method that does not declare `reads_forget` receives a `ForgetGuard` instead of the forget
data: touching it raises, so "FT and CoUn never read D_u" is enforced, not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from coun_tune.core.batching import Augmenter, DeviceSplit, shuffled_batches
from coun_tune.core.models import FeatureClassifier


@dataclass(frozen=True)
class HParam:
    """A hyperparameter a method declares: its default and a sensible search range.
    `log` says whether the range is searched on a log scale; `kind` is "float" or "int".
    `valid` is the hard (inclusive) range any value must lie in, searched or given."""

    name: str
    default: float | int
    low: float | int
    high: float | int
    log: bool = False
    kind: str = "float"
    help: str = ""
    valid: tuple[float, float] = (float("-inf"), float("inf"))


# Hyperparameters every method has (the shared recipe and the CL plug-in). A method may
# redeclare one of them with its own range (GA's lr: its authors use ~1e-5..1e-3).
COMMON_HPARAMS: tuple[HParam, ...] = (
    HParam("lr", 0.05, 0.01, 0.1, log=True, help="initial SGD learning rate (cosine to min(1e-4, lr/100))"),
    HParam("epochs", 10, 1, 50, kind="int", help="unlearning epochs"),
    HParam("temperature", 0.1, 0.01, 0.3, log=True, help="contrastive temperature tau (> 0)"),
    HParam("cl_weight", 0.0, 0.1, 6.0, log=True, help="weight lambda of the contrastive term; 0 = off"),
)


class ForgetDataAccessError(RuntimeError):
    """A method that declared it never reads the forget set touched it."""


class ForgetGuard:
    """Stands in for the forget split for methods that must not read it."""

    def __init__(self, method_name: str):
        object.__setattr__(self, "_method", method_name)

    def __getattr__(self, name: str) -> Any:
        raise ForgetDataAccessError(
            f"method {self._method!r} read the forget data ({name!r}) but declares reads_forget=False"
        )

    def __len__(self) -> int:
        raise ForgetDataAccessError(
            f"method {self._method!r} read the forget data (len) but declares reads_forget=False"
        )


@dataclass
class Batch:
    """The rows one optimiser step trains on, before augmentation.

    x (N, C, H, W) uint8; y (N,) int64, the labels the method trains with (RL: random labels
    on the forget rows); forget (N,) bool, True for rows from D_u, or None when every row is
    a retain row. `phase` names the kind of step where a method has several (SCRUB: "max"
    on D_u, "min" on D_r)."""

    x: torch.Tensor
    y: torch.Tensor
    forget: torch.Tensor | None = None
    phase: str = ""

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Step:
    """One batch as the engine prepared it: view 1 x1 (N, C, H, W) float32 of every row,
    labels y (N,), forget (N,) bool or None (see Batch), features z1 (N, D) and logits (N, K)
    of view 1. The engine computes view 2 (of the retain rows) only when the CL plug-in is on."""

    x1: torch.Tensor
    y: torch.Tensor
    z1: torch.Tensor
    logits: torch.Tensor
    epoch: int
    step: int
    forget: torch.Tensor | None = None
    phase: str = ""


@dataclass
class MethodContext:
    """What a method may use. `forget` is a ForgetGuard unless the method reads_forget.
    `original` is a frozen copy of theta_o (for teachers, masks); `generator` the run's RNG.
    `work` counts samples for the FLOPs metrics (metrics.flops_from_work): "trained" samples
    went forward + backward (counted once per sample and step, whatever its number of views),
    "views" further views of samples already counted went forward + backward with them (the
    CL plug-in's second view), "forward_only" samples went forward alone (e.g. a teacher's).
    The engine counts its own passes, a method adds what it runs besides (`count`)."""

    model: FeatureClassifier
    original: FeatureClassifier
    retain: DeviceSplit
    forget: DeviceSplit | ForgetGuard
    augmenter: Augmenter
    num_classes: int
    batch_size: int
    epochs: int
    generator: torch.Generator
    hparams: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    # The engine's optimiser (the shared SGD recipe); None outside a run.
    optimizer: torch.optim.Optimizer | None = None
    work: dict[str, int] = field(default_factory=lambda: {"trained": 0, "views": 0, "forward_only": 0})

    def count(self, trained: int = 0, forward_only: int = 0, views: int = 0) -> None:
        """trained: new samples forward + backward (one view each); views: extra views of
        samples this step already counted; forward_only: samples forward alone. (`get`: a
        checkpoint written before "views" existed resumes with 0.)"""
        for key, n in (("trained", trained), ("views", views), ("forward_only", forward_only)):
            self.work[key] = self.work.get(key, 0) + int(n)

    # Forget data. These helpers go through `self.forget`, so a method that declares
    # reads_forget=False and calls them hits the ForgetGuard and raises.

    def forget_batch_size(self) -> int:
        """Samples per forget batch: the run's batch size, capped at |D_u|."""
        return min(self.batch_size, len(self.forget))

    def forget_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random forget batch, drawn without replacement with `generator` and augmented
        with the run's augmenter (one draw per sample, like the retain views).
        Returns x (n, C, H, W) float32 and y (n,) int64, n = forget_batch_size()."""
        forget = self.forget
        n = self.forget_batch_size()
        idx = torch.randperm(len(forget), generator=self.generator, device=self.generator.device)[:n]
        idx = idx.to(forget.x.device)
        return self.augmenter(forget.x[idx], self.generator), forget.y[idx]


def budget_epochs(fraction: float, epochs: int) -> int:
    """How many of a run's `epochs` a budget-relative hyperparameter covers: fraction x epochs
    rounded half up, at least 1 when fraction > 0 and at most `epochs`; 0 when fraction is 0.
    So l1-sparse's "first 4 of 50 epochs" (fraction 0.08) is 4 epochs at 50 and 1 at 5, and
    SCRUB's msteps 2 of 3 epochs (fraction 2/3) is 2 at 3 and 33 at 50: a setting means the
    same share of the run at every budget, as a search over `epochs` needs."""
    if fraction <= 0:
        return 0
    return int(min(epochs, max(1, math.floor(fraction * epochs + 0.5))))


def batches_in(n: int, batch_size: int) -> int:
    """How many batches shuffled_batches(n, batch_size, ...) yields: the chunks of
    batch_size, less a last (or only) chunk of a single sample, which it drops."""
    return sum(1 for start in range(0, n, batch_size) if min(batch_size, n - start) >= 2)


def retain_epoch(ctx: MethodContext, phase: str = "") -> Iterator[Batch]:
    """One shuffled pass over D_r in batches of ctx.batch_size (the permutation drawn with
    ctx.generator): batches_in(|D_r|, batch_size) batches."""
    r = ctx.retain
    for idx in shuffled_batches(len(r), ctx.batch_size, ctx.generator, r.x.device):
        yield Batch(r.x[idx], r.y[idx], None, phase)


def forget_epoch(ctx: MethodContext, phase: str = "") -> Iterator[Batch]:
    """One shuffled pass over D_u in batches of forget_batch_size(), every row marked forget."""
    f = ctx.forget
    for idx in shuffled_batches(len(f), ctx.forget_batch_size(), ctx.generator, f.x.device):
        yield Batch(f.x[idx], f.y[idx], torch.ones(len(idx), dtype=torch.bool, device=idx.device), phase)


def mixed_epoch(ctx: MethodContext, forget_y: torch.Tensor, retain_idx: torch.Tensor | None = None) -> Iterator[Batch]:
    """One shuffled loader over D_u + D_r (as torch's ConcatDataset([forget, retain]) with
    shuffle=True): rows 0..|D_u|-1 are D_u with labels `forget_y` (|D_u|,), the rest are D_r
    (or its rows `retain_idx`) with their labels, in batches of ctx.batch_size. So D_u weighs
    |D_u| / (|D_u| + |D_r|) of every epoch's rows."""
    f, r = ctx.forget, ctx.retain
    rx, ry = (r.x, r.y) if retain_idx is None else (r.x[retain_idx], r.y[retain_idx])
    n_f, n_r = len(f), len(ry)
    for idx in shuffled_batches(n_f + n_r, ctx.batch_size, ctx.generator, r.x.device):
        is_f = idx < n_f
        if n_f == 0 or n_r == 0:  # one source only: plain gathers
            x, y = (rx[idx], ry[idx]) if n_f == 0 else (f.x[idx], forget_y[idx])
            yield Batch(x, y, is_f)
            continue
        # Gather a row from each source for every position and keep the right one with
        # torch.where: boolean-mask indexing (x[is_f] = ...) needs the mask's count on the
        # host, a GPU sync on every step. The clamped indices of the unused side are discarded.
        fi, ri = idx.clamp(max=n_f - 1), (idx - n_f).clamp(min=0, max=n_r - 1)
        x = torch.where(is_f.view(-1, *[1] * (rx.dim() - 1)), f.x[fi], rx[ri])
        yield Batch(x, torch.where(is_f, forget_y[fi], ry[ri]), is_f)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature 1, averaged over the batch.

    student_logits, teacher_logits: (N, K). Returns a scalar; the gradient flows into the
    student only (the teacher's logits are detached). This is SCRUB's `DistillKL` and Bad
    Teacher's `F.kl_div(log_softmax(student), softmax(teacher))` with T = 1 and a per-sample
    ("batchmean") reduction, the one that is a true KL divergence."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), dim=1),
        F.log_softmax(teacher_logits.detach().float(), dim=1),
        reduction="batchmean",
        log_target=True,
    )


class Method:
    """Base class. Subclasses set `name`, `reads_forget`, `hparams` and implement `loss`;
    a method that does not train on retain batches overrides `epoch_batches` and
    `steps_in_epoch` together."""

    name: str = ""
    reads_forget: bool = False
    hparams: tuple[HParam, ...] = ()
    default_cl_weight: float = 0.0

    def prepare(self, ctx: MethodContext) -> None:
        """Called once before the first step (e.g. compute a mask, build a teacher). Also
        called on resume, *before* the checkpoint is loaded, with a freshly seeded
        `ctx.generator`: whatever prepare draws from it is therefore the same in a resumed
        run as in an uninterrupted one."""

    def epoch_batches(self, ctx: MethodContext, epoch: int) -> Iterator[Batch]:
        """The batches of epoch `epoch` (0-based), one optimiser step each. Default: one
        shuffled pass over D_r."""
        return retain_epoch(ctx)

    def steps_in_epoch(self, ctx: MethodContext, epoch: int) -> int:
        """len(list(epoch_batches(ctx, epoch))), without drawing anything: the cosine
        schedule's length is the sum over all epochs (the engine checks the two agree)."""
        return batches_in(len(ctx.retain), ctx.batch_size)

    def loss(self, ctx: MethodContext, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def before_step(self, ctx: MethodContext) -> None:
        """Called between loss.backward() and optimizer.step() (e.g. mask gradients)."""

    def after_step(self, ctx: MethodContext) -> None:
        """Called after each optimiser step (e.g. hold masked weights at theta_o)."""

    def state_dict(self) -> dict[str, Any]:
        """Extra state a checkpoint must hold to resume exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
