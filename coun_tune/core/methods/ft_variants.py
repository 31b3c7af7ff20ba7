"""Fine-tuning variants that never read D_u: l1-sparse and NoT (METHOD.md section 3).

- l1-sparse (Jia et al., "Model Sparsity Can Simplify Machine Unlearning", NeurIPS 2023;
  OPTML-Group/Unlearn-Sparse `unlearn/FT.py`, `FT_l1`): FT + alpha_e * ||theta||_1 over all
  parameters, alpha_e = alpha * (1 - e / n) in epoch e < n (0-based) and 0 after: the released
  code's per-epoch linear decay (`current_alpha = args.alpha * (1 - epoch / (unlearn_epochs -
  no_l1_epochs))`), n being the number of epochs it is applied for. n is set relative to the
  run's budget: `l1_fraction` of the epochs (base.budget_epochs: rounded half up, at least 1),
  so a search over `epochs` compares one method at every budget. The references: the CoUn
  paper applies l1 for the first 4 of its 50 epochs (fraction 0.08, the default); the
  l1-sparse code's own setting is `no_l1_epochs` 0 over its 10 unlearning epochs, l1 in every
  epoch (fraction 1.0). The search range [0.08, 1.0] holds both.
- NoT (Khalil et al., "NoT: Federated Unlearning via Weight Negation", CVPR 2025, the CoUn
  authors' own baseline): negate the first layer's weights of theta_o, then FT. The method
  negates parameter tensors by their index in `model.parameters()`: the first (index 0) for a
  CNN (an implementation of NoT negates `enumerate(model.parameters())` below
  `negate_layers = 1`), i.e. the stem conv's *weight* only: VGG's stem conv bias (index 1) is
  left as it is, and ResNet-18's stem has no bias. For the ViT, CoUn's appendix
  negates "the positional embedding and the second patch-embedding layer (indices 0 and 4)".
  Those indices are positions in `list(model.parameters())` of lucidrains' `vit_pytorch` ViT,
  whose patch embedding is Sequential(Rearrange, LayerNorm(patch_dim), Linear(patch_dim, dim),
  LayerNorm(dim)) and whose own parameters come first: [0] pos_embedding, [1] cls_token,
  [2] / [3] the first LayerNorm's weight / bias, [4] the Linear's weight, [5] its bias. So
  index 4 is the Linear's *weight* (the second layer of the patch embedding), not its bias
  and not a LayerNorm. Our ViTSmall's patch embedding is (LayerNorm, Linear, LayerNorm):
  NoT negates `pos_embedding` and `patch_embed.1.weight` (tests/test_method_semantics.py
  rebuilds lucidrains' parameter order and checks indices 0 and 4 name these two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coun_tune.core.methods.base import HParam, MethodContext, Step, budget_epochs
from coun_tune.core.methods.ft import FT


class L1Sparse(FT):
    """loss = CE(logits_r, y_r) + alpha_e * sum_i |theta_i| (logits_r (N, K) of view 1)."""

    name = "l1_sparse"
    reads_forget = False
    hparams = (
        HParam(
            "l1_alpha",
            5e-4,
            1e-4,
            1e-1,
            log=True,
            help="l1-sparse: initial weight of ||theta||_1",
            valid=(0.0, float("inf")),
        ),
        HParam(
            "l1_fraction",
            0.08,
            0.08,
            1.0,
            log=True,
            help="l1-sparse: share of the run's epochs over which the l1 weight decays to 0 (CoUn: 4/50)",
            valid=(0.0, 1.0),
        ),
    )

    @staticmethod
    def alpha(alpha0: float, l1_fraction: float, epochs: int, epoch: int) -> float:
        """The l1 weight in epoch `epoch` (0-based) of a run of `epochs` epochs."""
        n = budget_epochs(l1_fraction, epochs)
        return alpha0 * (1.0 - epoch / n) if epoch < n else 0.0

    def loss(self, ctx: MethodContext, step: Step) -> torch.Tensor:
        loss = F.cross_entropy(step.logits, step.y)
        a = self.alpha(ctx.hparams["l1_alpha"], ctx.hparams["l1_fraction"], ctx.epochs, step.epoch)
        if a > 0:  # past the l1 epochs this is plain FT: skip the norm altogether
            loss = loss + a * torch.cat([p.flatten() for p in ctx.model.parameters()]).abs().sum()
        return loss


VIT_NOT_PARAMS = ("pos_embedding", "patch_embed.1.weight")


def first_layer(model: nn.Module) -> nn.Module:
    """The first Conv2d or Linear module in definition order (the stem conv of every
    architecture here: SmallCNN's body[0][0], ResNet-18's stem[0])."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return m
    raise ValueError("model has no Conv2d or Linear layer to negate")


def not_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters NoT negates: the ViT's positional embedding and patch-embedding
    Linear weight (CoUn's indices 0 and 4), else the first layer's weight (not its bias)."""
    names = dict(model.named_parameters())
    if "pos_embedding" in names:
        return list(VIT_NOT_PARAMS)
    layer = first_layer(model)
    prefix = next(n for n, m in model.named_modules() if m is layer)
    return [f"{prefix}.weight"]


class NoT(FT):
    """prepare(): every parameter in not_parameters(model) := -(theta_o's); then FT."""

    name = "not"
    reads_forget = False

    @torch.no_grad()
    def prepare(self, ctx: MethodContext) -> None:
        # Copied from ctx.original (not negated in place) so the result is -theta_o's layer
        # whatever state the model arrives in; a resume then loads its own weights on top.
        src, dst = dict(ctx.original.named_parameters()), dict(ctx.model.named_parameters())
        for name in not_parameters(ctx.model):
            dst[name].copy_(-src[name])
