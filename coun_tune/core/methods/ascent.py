"""Gradient-ascent baselines: GA and NegGrad+ (METHOD.md section 3).

- GA ("gradient ascent"; Thudi et al. 2022, Graves et al. 2021; the SalUn / l1-sparse
  harness, OPTML-Group/Unlearn-Saliency `unlearn/GA.py`): minimise -CE on D_u.
- NegGrad+ (Kurmanji et al., "Towards Unbounded Machine Unlearning", NeurIPS 2023, the SCRUB
  paper's strengthened NegGrad): beta * CE(D_r batch) - (1 - beta) * CE(D_u batch).

Both run inside the engine's retain loop, so one epoch = one pass over D_r and every step
draws one random forget batch (`ctx.forget_batch()`, ctx.generator, the run's augmentation).
For NegGrad+ this is what the SCRUB code does (it cycles the forget loader alongside the
retain loader). For GA it means an "epoch" holds |D_r| / batch_size forget steps rather than
the original code's |D_u| / batch_size: the same loss, on a different clock; lr and epochs
are searched anyway. GA's loss does not use the retain batch, so the engine skips its retain
forward (`uses_retain_step = False`) unless the CL plug-in is on, which adds L_CL on the
retain views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coun_tune.core.methods.base import HParam, Method, MethodContext, RetainStep


class GA(Method):
    """loss = -CE(f(x_u), y_u) on a random forget batch x_u (n, C, H, W), y_u (n,)."""

    name = "ga"
    reads_forget = True
    uses_retain_step = False

    def loss(self, ctx: MethodContext, step: RetainStep) -> torch.Tensor:
        xf, yf = ctx.forget_batch()
        return -F.cross_entropy(ctx.model(xf), yf)

    def extra_forwards(self, ctx: MethodContext, epoch: int) -> int:
        return 3 * ctx.forget_batch_size() * ctx.steps_per_epoch  # forward + backward per forget sample


class NegGradPlus(Method):
    """loss = beta * CE(logits_r, y_r) - (1 - beta) * CE(f(x_u), y_u).

    logits_r (N, K): the engine's view-1 logits of the retain batch; x_u (n, C, H, W): a
    random forget batch. beta close to 1 keeps the ascent term small (the paper's range
    [0.95, 0.9999]): ascent alone drives CE on D_u up without bound."""

    name = "neggrad_plus"
    reads_forget = True
    hparams = (
        HParam("neggrad_beta", 0.999, 0.95, 0.9999, help="NegGrad+: weight of retain CE; 1 - beta weighs forget ascent",
               valid=(0.0, 1.0)),
    )

    def loss(self, ctx: MethodContext, step: RetainStep) -> torch.Tensor:
        beta = ctx.hparams["neggrad_beta"]
        xf, yf = ctx.forget_batch()
        return beta * F.cross_entropy(step.logits, step.y) - (1.0 - beta) * F.cross_entropy(ctx.model(xf), yf)

    def extra_forwards(self, ctx: MethodContext, epoch: int) -> int:
        return 3 * ctx.forget_batch_size() * ctx.steps_per_epoch
