"""The paper's other two architectures, with the same explicit `features()` / `classifier()`
split as `models.py` (no hooks):

- `VGG16BN` ("vgg16_bn"): VGG-16 with batch norm for 32x32 inputs, then a 1024-d penultimate
  layer; `features()` returns that 1024-d vector.
- `ViTSmall` ("vit_small", "vit_small_64"): a ViT for small images (patch 4, width 512, depth 6);
  `features()` returns the class token after the final LayerNorm (512-d).

Both take `(in_channels, num_classes)` like every entry of `models.ARCHITECTURES`; the ViT also
takes `image_size` because its learned positional embedding is sized from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coun_tune.core.model_base import FeatureClassifier

# VGG-16 ("configuration D"): channel counts of the 3x3 convs, "M" = 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG16BN(FeatureClassifier):
    """VGG-16 with batch norm, CIFAR-style, with a 1024-d penultimate layer.

    Body: the 13 3x3 convs of VGG-16 (each conv with bias + BatchNorm2d + ReLU, as torchvision's
    `vgg16_bn` and the VGG of the SalUn / l1-sparse unlearning code), five 2x2 max-pools, then
    adaptive average pooling to 1x1 (a no-op at 32x32, where the map is already 1x1; at 64x64 it
    averages the 2x2 map), giving 512 values. Head: Linear(512, 1024, no bias) + BatchNorm1d(1024)
    + ReLU is the 1024-d penultimate representation `features()` returns (the contrastive term
    is computed on it), and `fc` = Linear(1024, num_classes). The SalUn / l1-sparse VGG maps the
    512-d pooled vector straight to the classes; the hidden 1024-d layer with batch norm is the
    one extra layer that gives the 1024-d penultimate representation.

    Parameters for 3 input channels: 14,723,136 in the convs and their batch norms
    (14,714,688 conv weights and biases, 8,448 BN affine), 526,336 in the 1024-d layer, and
    1024 * K + K in `fc`: 15,259,722 for K = 10 (CIFAR-10), 15,351,972 for K = 100, 15,454,472
    for K = 200 (TinyImageNet). The paper names this model "VGG-16" (with BN, CIFAR-style, 1024-d
    penultimate layer); ~15.3M parameters, against ~138M for ImageNet's VGG-16 with its
    4096-wide head.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_dim: int = 1024):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))  # ceil: 28x28 and 8x8 inputs work too
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                cin = int(v)
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(cin, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)
        )
        self.feature_dim = hidden_dim
        self.fc = nn.Linear(hidden_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _Attention(nn.Module):
    """Pre-norm multi-head self-attention: heads x dim_head inner width, projected back to dim."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = self.to_qkv(self.norm(x)).view(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(dim_head)) v, with dropout on the attention weights while training
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(n, t, -1))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ViTSmall(FeatureClassifier):
    """A Vision Transformer for small images, in the style of lucidrains' `vit-pytorch` `ViT` as
    used for CIFAR-sized inputs: image_size/4 x image_size/4 patches of 4x4, each flattened and
    embedded by LayerNorm + Linear(patch_dim, 512) + LayerNorm; a learned class token and a
    learned positional embedding (1 + num_patches positions); embedding dropout 0.1; 6 pre-norm
    blocks of multi-head attention (12 heads of dim_head 64: inner width 768, projected back to
    512; qkv without bias; dropout 0.1) and an MLP 512 -> 1024 -> 512 with GELU and dropout 0.1,
    each with a residual connection; a final LayerNorm. `features()` returns the class token
    after that LayerNorm (512-d); `fc` = Linear(512, num_classes). (The shifted-patch
    tokenisation and locality self-attention of the "ViT for small-size datasets" paper are not
    used: the blocks are the plain ViT's.)

    Parameters for 3 input channels at 32x32 (patch_dim 48, 64 patches, 65 tokens):
    patch embedding 26,208 (LN(48) 96 + Linear 25,088 + LN(512) 1,024), class token 512,
    positional embedding 65 * 512 = 33,280, each block 2,625,536 (attention 1,574,400: LN 1,024
    + qkv 512 * 2304 = 1,179,648 + out 768 * 512 + 512 = 393,728; MLP 1,051,136: LN 1,024
    + 525,312 + 524,800), 6 blocks 15,753,216, final LN 1,024, and `fc` 512 * K + K:
    15,819,370 for K = 10, 15,865,540 for K = 100. At 64x64 (`image_size=64`, 257 tokens) the
    positional embedding grows to 257 * 512 = 131,584: 16,015,144 for K = 200 (TinyImageNet).
    The paper's description is a ViT for small datasets (patch 4, dim 512, depth 6, 12 heads of
    64, MLP 1024, dropout 0.1); that is ~15.8M parameters, not the ~86M of ViT-B/16.

    `image_size` must be the input's height and width (square): "vit_small" is registered for
    32x32 inputs (CIFAR), "vit_small_64" for 64x64 (TinyImageNet). A mismatched input raises
    ValueError in `features()`.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 512,
        depth: int = 6,
        heads: int = 12,
        dim_head: int = 64,
        mlp_dim: int = 1024,
        dropout: float = 0.1,
        emb_dropout: float = 0.1,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        num_patches = (image_size // patch_size) ** 2
        patch_dim = in_channels * patch_size * patch_size
        self.patch_embed = nn.Sequential(nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.blocks = nn.ModuleList(
            nn.ModuleList([_Attention(dim, heads, dim_head, dropout), _FeedForward(dim, mlp_dim, dropout)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.feature_dim = dim
        self.fc = nn.Linear(dim, num_classes)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw the ViT's own parameters (class token, positional embedding) as __init__
        does; submodules reset themselves. (Bad Teacher's incompetent teacher uses it.)"""
        self.cls_token.normal_()
        self.pos_embedding.normal_()

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_patches, p * p * C), patches in row-major order, each
        flattened as (p1, p2, c) like einops' "b c (h p1) (w p2) -> b (h w) (p1 p2 c)"."""
        n, c, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"ViTSmall was built for {self.image_size}x{self.image_size} inputs, got {h}x{w} "
                f"(use vit_small for 32x32, vit_small_64 for 64x64)"
            )
        p = self.patch_size
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(self._patches(x))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = self.emb_dropout(torch.cat([cls, tokens], dim=1) + self.pos_embedding)
        for attn, ff in self.blocks:
            tokens = tokens + attn(tokens)
            tokens = tokens + ff(tokens)
        return self.norm(tokens[:, 0])  # LayerNorm is per token: normalising only the class token is the same
