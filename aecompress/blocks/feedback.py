"""Error feedback through the calibration inputs' inverse second moment, shared by the methods that round with it.

``compensated`` and ``entropy`` both round a matrix column by column and carry each column's error into
the columns not yet rounded (the optimal-brain-surgeon update GPTQ uses). What they share is here: the
factor that spreads the error, the ridge that keeps it defined, and the inputs it needs for every matrix.
"""

from __future__ import annotations

import torch

from aecompress.blocks.base import GroupStats
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup


def check_damp(damp, method: str) -> None:
    """One line unless ``damp`` is a number of 0 or more (below 0 there is no Cholesky factor)."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise AECompressError(f"{method} damp {damp!r} is not a ridge; it must be 0 or more (default 0.01)")


def member_covariances(stats: GroupStats, group: WeightGroup, method: str) -> list[torch.Tensor]:
    """Every member's input second moment, or one line if a member has none (an embedding is no linear layer)."""
    if any(c is None for c in stats.covariances):
        raise AECompressError(f"method {method!r} needs the input of a linear layer for every matrix of {group.name!r}")
    return list(stats.covariances)


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """A float64 copy of ``H + damp·mean(diag H)·I``, dead inputs given a unit diagonal: the second moment rounding
    is measured under (the same ridge the feedback factor is made from)."""
    h = h.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())  # in place: no identity matrix beside it
    return h


def inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹``: row ``j`` spreads column ``j``'s error onward."""
    h = damped(h, damp)
    # Two width x width float64 matrices at a time, not four (0.97 GB each for an 11008-wide input).
    lower = torch.linalg.cholesky(h)
    del h
    inverse = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(inverse, upper=True)
