"""How the unlearning loop runs on its device: the GPU fast path, as options with faithful defaults.

    FastPath(channels_last, bf16_autocast, compile, fused_views, check_every, cudnn_benchmark)

Every field left at None is decided by the device (`resolve`): on CUDA, channels_last weights,
bf16 autocast (Ampere or newer), one non-finite check per epoch and cuDNN autotuning; on CPU
everything off and a check every step, which is exactly the loop as it was before these options existed (bit-identical
weights, tests/test_fastpath.py). `compile` and `fused_views` are never on unless asked for.

- channels_last: model weights in NHWC, the layout tensor cores want for convolutions. Inputs
  follow: a convolution whose weight is channels_last returns channels_last outputs.
- bf16_autocast: forward passes in bfloat16 (no loss scaling needed, same exponent range as
  fp32). The contrastive term stays fp32 (losses.contrastive_loss turns autocast off and casts
  z1, z2 to float32); cross-entropy is fp32 under autocast by PyTorch's own op lists.
- compile: `torch.compile` of the model's `features` (the network without its last linear
  layer) for the training loop's common batch shape only; evaluation and other shapes run
  eagerly, so a run compiles once (tens of seconds on a GPU, paid in its first step).
- fused_views: one forward of the 2N stacked views instead of two forwards of N. Faster, but
  not the paper's computation: batch norm normalises over both views together (and updates
  its running statistics once per step instead of twice), and view 2 is drawn before the
  method's own random draws. Exactly equal losses for a model without batch norm.
- check_every: a NaN/inf loss must end the trial (DivergedError), but reading a flag from the
  GPU every step stalls the host until the step has run. The loop instead keeps a device-side
  record of the first non-finite step and reads it every `check_every` steps and at the end
  of each epoch (0: at the end of each epoch only). 1 checks every step, as before.
- cudnn_benchmark: let cuDNN time its convolution algorithms for each new shape and keep the
  fastest (the shapes of a run are fixed). A process-wide flag: the engine sets it at the start
  of every run on CUDA, to this run's value.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from coun_tune.errors import DivergedError, UsageError


@dataclass(frozen=True)
class FastPath:
    """Options of the training loop; None = decided by the device (see the module docstring)."""

    channels_last: bool | None = None
    bf16_autocast: bool | None = None
    compile: bool = False
    fused_views: bool = False
    check_every: int | None = None
    cudnn_benchmark: bool | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> FastPath:
        """From a spec's or a flag's mapping; unknown keys or wrong types raise UsageError."""
        names = [f.name for f in dataclasses.fields(cls)]
        d = dict(d or {})
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise UsageError(f"fast_path has no option {unknown[0]!r}; it has {', '.join(names)}")
        for k, v in d.items():
            if k == "check_every":
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                    raise UsageError(f"fast_path.check_every must be an integer >= 0, got {v!r}")
            elif v is not None and not isinstance(v, bool):
                raise UsageError(f"fast_path.{k} must be true or false, got {v!r}")
        return cls(**d)

    def resolve(self, device: torch.device | str) -> FastPath:
        """Every field concrete for `device`; raises UsageError for an option the device lacks."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        # bf16 pays on tensor cores from Ampere (compute capability 8) on; older GPUs emulate it
        bf16_fast = cuda and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
        if self.bf16_autocast and not (device.type == "cpu" or (cuda and torch.cuda.is_bf16_supported())):
            raise UsageError(f"bf16 autocast is not supported on {device}")
        if self.check_every is not None and self.check_every < 0:
            raise UsageError(f"check_every must be >= 0, got {self.check_every}")
        return FastPath(
            channels_last=cuda if self.channels_last is None else self.channels_last,
            bf16_autocast=bf16_fast if self.bf16_autocast is None else self.bf16_autocast,
            compile=self.compile,
            fused_views=self.fused_views,
            check_every=(0 if cuda else 1) if self.check_every is None else self.check_every,
            cudnn_benchmark=cuda if self.cudnn_benchmark is None else self.cudnn_benchmark,
        )

    def prepare(self, device: torch.device, *models: torch.nn.Module) -> None:
        """Applies what acts once per run (resolved options only): the cuDNN flag on CUDA, and
        the models' weights to channels_last (in place; they are left in that format)."""
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(self.cudnn_benchmark)
        if self.channels_last:
            for m in models:
                m.to(memory_format=torch.channels_last)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The forward passes' context: bf16 autocast, or nothing."""
        if self.bf16_autocast:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def fused_features(model: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of both views from one forward: x1, x2 (N, C, H, W) -> z1, z2 (N, D).
    Batch norm in training mode normalises over all 2N samples (see the module docstring)."""
    z = model.features(torch.cat([x1, x2]))
    return z[: x1.shape[0]], z[x1.shape[0] :]


@contextlib.contextmanager
def compiled_features(model: torch.nn.Module, enabled: bool, cache: dict) -> Iterator[None]:
    """While active, `model.features` is its torch.compile'd version (an instance attribute
    shadowing the method, removed on exit, so evaluation, state_dict and deepcopy see the plain
    model). `cache` keeps the compiled function across epochs so it compiles once per run.
    Why not torch.compile(model): that compiles forward() only, and the loop calls features()
    and classifier() separately (the contrastive term needs the features)."""
    if not enabled:
        yield
        return
    if "features" not in cache:
        eager = model.features  # the bound method (compiling it does not recurse into the attribute)
        compiled = torch.compile(eager, dynamic=False)

        def features(x: torch.Tensor) -> torch.Tensor:
            # The first batch shape is the epoch's common one: compiled once. Other shapes (the
            # short last batch, a method's forget batches) run eagerly instead of recompiling.
            return compiled(x) if cache.setdefault("shape", x.shape) == x.shape else eager(x)

        cache["features"] = features
    model.features = cache["features"]
    try:
        yield
    finally:
        del model.features


class NonFiniteWatch:
    """Remembers, on the loss's device, the first step of an epoch whose loss was NaN or inf.

    observe() queues a few tiny device ops and never waits for the GPU; due() says when to
    read; first_bad() reads (one host sync) and returns (step, loss value) or None.
    With every == 1 it checks on the spot, as the loop always did (CPU: there is no queue).
    """

    def __init__(self, every: int):
        self.every = every
        self._step: torch.Tensor | None = None  # () int64: first bad step, -1 = none yet
        self._value: torch.Tensor | None = None  # () float32: the loss at that step
        self._eager: tuple[int, float] | None = None

    def reset(self) -> None:
        """Forget what was seen (call at the start of each epoch)."""
        self._step = self._value = None
        self._eager = None

    def observe(self, loss: torch.Tensor, step: int) -> None:
        if self.every == 1:
            if self._eager is None and not torch.isfinite(loss):
                self._eager = (step, float(loss.item()))
            return
        loss = loss.detach().float()
        if self._step is None:
            self._step = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self._value = torch.zeros((), dtype=torch.float32, device=loss.device)
        new = (~torch.isfinite(loss)) & (self._step < 0)
        self._step = torch.where(new, torch.full_like(self._step, step), self._step)
        self._value = torch.where(new, loss, self._value)

    def due(self, step: int) -> bool:
        """Whether to read after step `step` (0-based) of the epoch (the end of the epoch is
        always read by the caller)."""
        return self.every == 1 or (self.every > 0 and (step + 1) % self.every == 0)

    def first_bad(self) -> tuple[int, float] | None:
        if self.every == 1 or self._step is None:
            return self._eager
        step = int(self._step.item())
        return None if step < 0 else (step, float(self._value.item()))

    def raise_if_bad(self, epoch: int) -> None:
        """DivergedError naming the epoch (1-based) and step of the first NaN/inf loss, if any."""
        bad = self.first_bad()
        if bad is not None:
            raise DivergedError(f"loss is {bad[1]} at epoch {epoch + 1}, step {bad[0] + 1}")
