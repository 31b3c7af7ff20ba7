"""FT (fine-tune on the retain set with cross-entropy) and CoUn (FT with the CL plug-in on).

CoUn is not a second implementation: it *is* FT whose default `cl_weight` is 1.0, so the
engine adds lambda * L_CL through the one plug-in path (METHOD.md sections 2 and 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coun_tune.core.methods.base import Method, MethodContext, Step


class FT(Method):
    name = "ft"
    reads_forget = False

    def loss(self, ctx: MethodContext, step: Step) -> torch.Tensor:
        return F.cross_entropy(step.logits, step.y)


class CoUn(FT):
    """L = CE(classifier(z1), y) + lambda * L_CL(z1, z2; tau), on retain data only."""

    name = "coun"
    default_cl_weight = 1.0
