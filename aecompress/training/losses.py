"""The weight-space training objectives: per-row reconstruction and the data-aware whitened error.

The model-level objective (output mismatch against the original) is :mod:`aecompress.training.teacher`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def row_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None,
    cos_weight: float,
    rmse_weight: float,
) -> torch.Tensor:
    """The seed loss: weighted cosine distance plus RMSE, in float32.

    Args:
        recon: decoded rows (any dtype; cast to float32 so fp16 cannot overflow).
        target: original rows.
        weights: optional per-row importance (e.g. Fisher); normalized to mean 1.
        cos_weight: weight of the mean cosine distance (the seed uses 10/11).
        rmse_weight: weight of the root mean squared error (the seed uses 1/11).
    """
    recon, target = recon.float(), target.float()
    cos = 1 - F.cosine_similarity(recon, target, dim=1, eps=1e-8)
    mse = (recon - target).pow(2).mean(dim=1)
    if weights is None:
        w = torch.ones_like(cos)
    else:
        w = weights.float()
    w = w / w.sum().clamp_min(1e-12)
    return cos_weight * (w * cos).sum() + rmse_weight * (w * mse).sum().clamp_min(1e-20).sqrt()


def whitened_loss(
    recon: torch.Tensor, target: torch.Tensor, member: torch.Tensor, factors: torch.Tensor
) -> torch.Tensor:
    """Relative data-aware error: sum_m ||(W'_m - W_m) L_m||^2 / sum_m ||W_m L_m||^2.

    ``L_m`` (``factors[m]``) is the Cholesky factor of member m's calibration input
    covariance, so the error counts what the layer's outputs would lose on real
    inputs rather than raw weight distance. Rows of a batch may come from any
    members; each is measured with its own layer's factor.
    """
    num = recon.new_zeros((), dtype=torch.float32)
    den = recon.new_zeros((), dtype=torch.float32)
    for m in torch.unique(member).tolist():
        sel = member == m
        lower = factors[m].float()
        num = num + ((recon[sel].float() - target[sel].float()) @ lower).pow(2).sum()
        den = den + (target[sel].float() @ lower).pow(2).sum()
    return num / den.clamp_min(1e-30)
