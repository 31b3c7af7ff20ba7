"""What an unlearning method is, to the engine.

A method supplies the loss of one optimisation step on a retain batch (and, if it declares
`reads_forget`, whatever it draws from the forget set). The engine owns everything else: the
optimiser recipe shared by all methods (SGD, momentum 0.9, weight decay 5e-4, cosine to 1e-4),
augmentation, the CL plug-in (`cl_weight` > 0 adds `cl_weight * contrastive_loss` on a second
view of the same retain batch, for *any* method), evaluation and checkpoints.

A method that does not declare `reads_forget` receives a `ForgetGuard` instead of the forget
data: touching it raises, so "FT and CoUn never read D_u" is enforced, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

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


# Hyperparameters every method has (the shared recipe and the CL plug-in).
COMMON_HPARAMS: tuple[HParam, ...] = (
    HParam("lr", 0.05, 0.01, 0.1, log=True, help="initial SGD learning rate (cosine to 1e-4)"),
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
        raise ForgetDataAccessError(f"method {self._method!r} read the forget data ({name!r}) but declares reads_forget=False")

    def __len__(self) -> int:
        raise ForgetDataAccessError(f"method {self._method!r} read the forget data (len) but declares reads_forget=False")


@dataclass
class MethodContext:
    """What a method may use. `forget` is a ForgetGuard unless the method reads_forget.
    `original` is a frozen copy of theta_o (for teachers, masks); `generator` the run's RNG."""

    model: FeatureClassifier
    original: FeatureClassifier
    retain: DeviceSplit
    forget: DeviceSplit | ForgetGuard
    augmenter: Augmenter
    num_classes: int
    batch_size: int
    epochs: int
    steps_per_epoch: int
    generator: torch.Generator
    hparams: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    # The engine's optimiser (the shared SGD recipe), for methods that take optimiser steps
    # of their own outside the retain loop (SCRUB's max-steps); None outside a run.
    optimizer: torch.optim.Optimizer | None = None

    # Forget data. Both helpers go through `self.forget`, so a method that declares
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

    def forget_epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled pass over D_u in batches of forget_batch_size() (the permutation and
        the augmentation drawn with `generator`): yields (x (n, C, H, W) float32, y (n,))."""
        forget = self.forget
        for idx in shuffled_batches(len(forget), self.forget_batch_size(), self.generator, forget.x.device):
            yield self.augmenter(forget.x[idx], self.generator), forget.y[idx]


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) at temperature 1, averaged over the batch.

    student_logits, teacher_logits: (N, K). Returns a scalar; the gradient flows into the
    student only (the teacher's logits are detached). This is SCRUB's `DistillKL` and Bad
    Teacher's `F.kl_div(log_softmax(student), softmax(teacher))` with T = 1 and a per-sample
    ("batchmean") reduction, the one that is a true KL divergence."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=1), F.log_softmax(teacher_logits.detach().float(), dim=1),
                    reduction="batchmean", log_target=True)


@dataclass
class RetainStep:
    """One retain batch as the engine prepared it: view 1 (N, C, H, W) float, labels (N,),
    features z1 (N, D) and logits (N, K) of view 1. The engine computes view 2 only when the
    CL plug-in is on."""

    x1: torch.Tensor
    y: torch.Tensor
    z1: torch.Tensor
    logits: torch.Tensor
    epoch: int
    step: int


class Method:
    """Base class. Subclasses set `name`, `reads_forget`, `hparams` and implement `loss`."""

    name: str = ""
    reads_forget: bool = False
    # False for a method whose loss ignores the retain batch (GA): the engine then skips the
    # retain forward unless the CL plug-in needs it, so batch norm sees only what GA trains on.
    uses_retain_step: bool = True
    hparams: tuple[HParam, ...] = ()
    default_cl_weight: float = 0.0

    def prepare(self, ctx: MethodContext) -> None:
        """Called once before the first step (e.g. compute a mask, build a teacher). Also
        called on resume, *before* the checkpoint is loaded, with a freshly seeded
        `ctx.generator`: whatever prepare draws from it is therefore the same in a resumed
        run as in an uninterrupted one."""

    def before_epoch(self, ctx: MethodContext, epoch: int) -> None:
        """Called at the start of every epoch (0-based), inside the timed training block
        (e.g. SCRUB's max-steps pass over D_u with `ctx.optimizer`)."""

    def loss(self, ctx: MethodContext, step: RetainStep) -> torch.Tensor:
        raise NotImplementedError

    def before_step(self, ctx: MethodContext) -> None:
        """Called between loss.backward() and optimizer.step() (e.g. mask gradients)."""

    def after_step(self, ctx: MethodContext) -> None:
        """Called after each optimiser step (e.g. hold masked weights at theta_o)."""

    def extra_forwards(self, ctx: MethodContext, epoch: int) -> int:
        """Work this method does in `epoch` beyond the engine's retain passes, in
        sample-forward equivalents (a forward = 1, a forward + backward = 3), for the FLOPs
        count. Must be a pure function of (ctx, epoch) so a resumed run counts the same."""
        return 0

    def state_dict(self) -> dict[str, Any]:
        """Extra state a checkpoint must hold to resume exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
