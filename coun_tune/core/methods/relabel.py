"""Random-label baselines: RL and SalUn (METHOD.md section 3).

- RL (random labels; Golatkar et al. 2020, as run in the SalUn harness
  OPTML-Group/Unlearn-Saliency `unlearn/RL.py`): CE on D_u with labels drawn uniformly from
  *all* K classes, the true one included ("SalUn's variant", `np.random.randint(0,
  num_classes, ...)`), plus CE on D_r. The forget term's share is RL.py's: per epoch one
  shuffled loader over D_u (random labels, fresh every epoch) + D_r, as its CIFAR-100 /
  TinyImageNet path builds (`ConcatDataset([forget, retain])`, shuffle=True), one CE over
  each mixed batch. So D_u weighs |D_u| / (|D_u| + |D_r|) of the updates (10% at a 10%
  forget set), not a full forget term added to every retain step. (Its CIFAR-10 path takes
  a pass over D_u then one over D_r: the same share, in blocks.)
- SalUn (Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight
  Saliency in Both Image Classification and Generation", ICLR 2024): RL restricted to the
  salient weights. Saliency = |gradient of -CE on D_u| at theta_o; the mask keeps the top
  `salun_threshold` fraction (the *largest* |grad|) over all parameters together (one global
  ranking, as `generate_mask.py`). Gradients of the other weights are zeroed before each step,
  and after each step those weights are copied back from theta_o, so weight decay and momentum
  cannot move them either (SalUn's released code only masks the gradients, which lets weight
  decay shrink them; METHOD.md asks for them to stay exactly at theta_o).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from coun_tune.core.batching import ordered_batches
from coun_tune.core.methods.base import Batch, HParam, Method, MethodContext, Step, batches_in, mixed_epoch


class RL(Method):
    """loss = CE(logits, y) over a mixed batch: retain rows with their labels, forget rows
    with y_rand ~ U{0..K-1} (drawn with ctx.generator once per epoch for all of D_u, before
    the epoch's permutation, so a resume is exact). logits (N, K) of view 1."""

    name = "rl"
    reads_forget = True

    def epoch_batches(self, ctx: MethodContext, epoch: int) -> Iterator[Batch]:
        g = ctx.generator
        y_rand = torch.randint(0, ctx.num_classes, (len(ctx.forget),), generator=g, device=g.device)
        return mixed_epoch(ctx, y_rand.to(ctx.forget.y.device))

    def steps_in_epoch(self, ctx: MethodContext, epoch: int) -> int:
        return batches_in(len(ctx.forget) + len(ctx.retain), ctx.batch_size)

    def loss(self, ctx: MethodContext, step: Step) -> torch.Tensor:
        return F.cross_entropy(step.logits, step.y)


def saliency_mask(original: torch.nn.Module, ctx: MethodContext, threshold: float) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask of its shape}: True for the top `threshold` fraction of
    |sum over D_u batches of d(-CE)/d theta| at theta_o, ranked over all parameters together.

    As the released `generate_mask.py` (`save_gradient_ratio`): model in eval mode, the batch
    gradients of -CE (a mean over each batch) summed over D_u in order, no optimiser step
    while accumulating (older copies of the script step an optimiser in train mode; METHOD.md
    settles on the fixed one). Ties at the cut are broken by position (stable sort).
    Deviation, stated: the released script reads D_u through the training loader, with its
    random crop and flip; we take the test-time transform (no augmentation, no RNG draw), so
    the mask is a function of theta_o and D_u alone: every seed and every resume of a split
    shares one mask, and the saliency is the gradient on D_u's own images rather than on one
    random draw of their augmentations."""
    model = copy.deepcopy(original).eval().requires_grad_(True)
    forget = ctx.forget
    for idx in ordered_batches(len(forget), ctx.batch_size, forget.x.device):
        loss = -F.cross_entropy(model(ctx.augmenter.normalize(forget.x[idx])), forget.y[idx])
        loss.backward()  # grads accumulate over batches, like SalUn's `gradients[name] += grad`
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat(
        [
            p.grad.abs().flatten() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
            for _, p in model.named_parameters()
        ]
    )
    k = int(flat.numel() * threshold)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    out, start = {}, 0
    for name, p in zip(names, model.parameters()):
        out[name] = keep[start : start + p.numel()].view_as(p)
        start += p.numel()
    return out


class SalUn(RL):
    """RL with gradients masked by the saliency mask and masked-out weights held at theta_o."""

    name = "salun"
    reads_forget = True
    hparams = (
        HParam(
            "salun_threshold",
            0.5,
            0.1,
            1.0,
            help="SalUn: fraction of weights (top |grad| on D_u) that may change",
            valid=(0.0, 1.0),
        ),
    )

    def __init__(self) -> None:
        self.mask: dict[str, torch.Tensor] = {}

    def prepare(self, ctx: MethodContext) -> None:
        self.mask = saliency_mask(ctx.original, ctx, ctx.hparams["salun_threshold"])
        ctx.count(trained=len(ctx.forget))  # one forward + backward over D_u

    def before_step(self, ctx: MethodContext) -> None:
        for name, p in ctx.model.named_parameters():
            if p.grad is not None:
                p.grad.masked_fill_(~self.mask[name], 0.0)

    @torch.no_grad()
    def after_step(self, ctx: MethodContext) -> None:
        # Weight decay (and any momentum carried over) moved the masked-out weights even with
        # zero gradients: copy theta_o's values back, bit for bit.
        original = dict(ctx.original.named_parameters())
        for name, p in ctx.model.named_parameters():
            p.copy_(torch.where(self.mask[name], p, original[name]))

    # The mask goes into checkpoints: recomputing it on resume would be exact on CPU, but a
    # GPU's gradient sums may differ in the last bit and flip a weight at the cut.
    def state_dict(self) -> dict[str, Any]:
        return {"mask": {k: v.clone() for k, v in self.mask.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "mask" in state:
            self.mask = {k: v.to(self.mask[k].device) if k in self.mask else v for k, v in state["mask"].items()}
