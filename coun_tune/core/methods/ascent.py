"""Gradient-ascent baselines: GA and NegGrad+ (METHOD.md section 3).

- GA ("gradient ascent"; Thudi et al. 2022, Graves et al. 2021; the SalUn / l1-sparse
  harness, OPTML-Group/Unlearn-Saliency `unlearn/GA.py`): minimise -CE on D_u, one shuffled
  pass over D_u per epoch (|D_u| / batch steps), as GA.py loops over the forget loader. Its
  authors use small learning rates (about 1e-5 to 1e-3: ascent without a retain term
  collapses the model at the shared 0.01-0.1), so GA declares its own lr range, and the
  cosine floor follows the lr down (engine.cosine_floor).
  With the CL plug-in on, each GA step also carries a random retain batch (batch_size rows,
  drawn with ctx.generator) that only the contrastive term uses; without it GA never touches
  D_r, so batch norm sees only what GA trains on.
- NegGrad+ (Kurmanji et al., "Towards Unbounded Machine Unlearning", NeurIPS 2023, the SCRUB
  paper's strengthened NegGrad): beta * CE(D_r batch) - (1 - beta) * CE(D_u batch). One pass
  over D_r per epoch; every step draws one random forget batch (`ctx.forget_batch()`), as the
  SCRUB code cycles the forget loader alongside the retain loader, with its own forward.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from coun_tune.core.methods.base import Batch, HParam, Method, MethodContext, Step, batches_in, forget_epoch


class GA(Method):
    """loss = -CE(f(x_u), y_u) over the forget rows of the batch (logits (N, K) of view 1)."""

    name = "ga"
    reads_forget = True
    hparams = (
        HParam(
            "lr",
            1e-4,
            1e-5,
            1e-3,
            log=True,
            help="GA: initial SGD learning rate (its authors: ~1e-5..1e-3)",
            valid=(0.0, float("inf")),
        ),
    )

    def epoch_batches(self, ctx: MethodContext, epoch: int) -> Iterator[Batch]:
        with_retain = ctx.hparams["cl_weight"] > 0  # rows for the plug-in only
        for b in forget_epoch(ctx):
            if not with_retain:
                yield b
                continue
            r = ctx.retain
            idx = torch.randperm(len(r), generator=ctx.generator, device=ctx.generator.device)[: ctx.batch_size]
            idx = idx.to(r.x.device)
            yield Batch(
                torch.cat([b.x, r.x[idx]]),
                torch.cat([b.y, r.y[idx]]),
                torch.cat([b.forget, torch.zeros(len(idx), dtype=torch.bool, device=b.forget.device)]),
            )

    def steps_in_epoch(self, ctx: MethodContext, epoch: int) -> int:
        return batches_in(len(ctx.forget), ctx.forget_batch_size())

    def loss(self, ctx: MethodContext, step: Step) -> torch.Tensor:
        # the mean CE over the forget rows, as a masked mean: indexing by the mask
        # (logits[forget]) needs its count on the host, a GPU sync on every step
        ce = F.cross_entropy(step.logits, step.y, reduction="none")
        w = step.forget.to(ce.dtype)
        return -(ce * w).sum() / w.sum()


class NegGradPlus(Method):
    """loss = beta * CE(logits_r, y_r) - (1 - beta) * CE(f(x_u), y_u).

    logits_r (N, K): the engine's view-1 logits of the retain batch; x_u (n, C, H, W): a
    random forget batch. beta close to 1 keeps the ascent term small (the paper's range
    [0.95, 0.9999]): ascent alone drives CE on D_u up without bound."""

    name = "neggrad_plus"
    reads_forget = True
    hparams = (
        HParam(
            "neggrad_beta",
            0.999,
            0.95,
            0.9999,
            help="NegGrad+: weight of retain CE; 1 - beta weighs forget ascent",
            valid=(0.0, 1.0),
        ),
    )

    def loss(self, ctx: MethodContext, step: Step) -> torch.Tensor:
        beta = ctx.hparams["neggrad_beta"]
        xf, yf = ctx.forget_batch()
        ctx.count(trained=len(yf))
        return beta * F.cross_entropy(step.logits, step.y) - (1.0 - beta) * F.cross_entropy(ctx.model(xf), yf)
