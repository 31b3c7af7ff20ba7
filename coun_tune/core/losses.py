"""The contrastive term of CoUn, in one place so every method's plug-in uses the same code.

Khalil, Setayesh, Li. "CoUn: Empowering Machine Unlearning via Contrastive Learning",
NeurIPS 2025 (arXiv 2509.16391), Eq. for L_CL and the appendix listing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """CoUn's InfoNCE over two views of one batch.

    Args:
        z1, z2: (N, D) penultimate features of views 1 and 2 of the same N images
            (no projection head).
        temperature: tau > 0 (the paper searches (0, 0.3]).

    Returns:
        Scalar: CE(S / tau, arange(N)) + CE(S^T / tau, arange(N)), with
        S[i, j] = cos(z1_i, z2_j). Each row's softmax runs over the *other* view only
        (N terms: 1 positive, N - 1 negatives), and the two directions are summed, not
        averaged, as in the paper.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be (N, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError("contrastive_loss needs at least 2 samples (one positive, >= 1 negative)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # fp32 even under autocast: with tau ~0.1 a bf16 similarity matrix gives coarse logits
    with torch.autocast(z1.device.type, enabled=False):
        sim = F.normalize(z1.float(), dim=1) @ F.normalize(z2.float(), dim=1).T  # (N, N) cosines
        logits = sim / temperature
        target = torch.arange(z1.shape[0], device=z1.device)
        return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
