"""Grouped k-bit codes whose rounding compensates its own error on the calibration inputs.

Round-to-nearest rounds every weight on its own. Here the columns of each matrix are rounded one
at a time, and the error each leaves is carried into the columns not yet rounded, weighted by the
inverse of the input second moment ``H = E[x xᵀ]`` (the optimal-brain-surgeon update), so that the
layer's outputs on calibration inputs move as little as possible. The stored form is exactly
``quantize``'s with ``group_size`` (codes, a scale and a zero per group of columns, counted the
same way), and decodes and runs with its code; only the choice of codes differs. A group's scale
and zero are set from its columns as they stand when the group is reached.
"""

from __future__ import annotations

import torch

from aecompress.core.budget import budget_bytes, infeasible_bytes, largest_fitting
from aecompress.core.dtypes import FloatDtype
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.stored import StoredForm
from aecompress.methods import quantize
from aecompress.methods.base import GroupStats, Method, float_dtype, meta, needs_stats

MAX_BITS = 8


def _grid(w: torch.Tensor, levels: int, store: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's stored scale and zero (per row) from its current columns ``(rows, g)``."""
    low, high = w.amin(dim=1), w.amax(dim=1)
    return ((high - low) / levels).to(store), low.to(store)


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    s, z = scale.float(), zero.float()
    return torch.where(s > 0, torch.round((w - z) / torch.where(s > 0, s, 1)), 0).clamp(0, levels)


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹``: row ``j`` spreads column ``j``'s error onward."""
    h = h.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def _member(w: torch.Tensor, h: torch.Tensor, bits: int, g: int, store: torch.dtype, damp: float):
    """One matrix's codes, scales and zeros, columns rounded in order with the error carried forward."""
    levels = 2**bits - 1
    w = w.double().clone()
    factor = _inverse_factor(h, damp)
    rows, cols = w.shape
    codes = torch.zeros(rows, cols, dtype=torch.int32)
    scales, zeros = [], []
    for start in range(0, cols, g):
        scale, zero = _grid(w[:, start : start + g].float(), levels, store)
        scales.append(scale)
        zeros.append(zero)
        for j in range(start, start + g):
            q = _round(w[:, j].float(), scale, zero, levels)
            codes[:, j] = q.to(torch.int32)
            error = (w[:, j] - (zero.double() + scale.double() * q.double())) / factor[j, j]
            w[:, j + 1 :] -= error.unsqueeze(1) * factor[j, j + 1 :].unsqueeze(0)
    return codes, torch.stack(scales, 1), torch.stack(zeros, 1)


def compress(
    group: WeightGroup,
    rows: torch.Tensor,
    ratio: float,
    stats: GroupStats | None = None,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    dtype: FloatDtype = "float16",
    damp: float = 0.01,
) -> StoredForm:
    """Codes of ``bits`` bits (default: the most that fit) per ``group_size`` columns, error-compensated.

    Args:
        bits: code width in 1..8; ``None`` takes the largest that fits the budget.
        group_size: columns sharing one scale and zero point (e.g. 64); must divide the width;
            ``None``: one per row.
        dtype: the stored dtype of each scale and zero point.
        damp: ridge added to the input second moment, relative to its mean diagonal.
    """
    store = float_dtype(dtype, group, "compensated")
    stats = needs_stats(stats, "covariance", group, "compensated")
    m, n = group.rows, group.width
    group_size = n if group_size is None else group_size
    if not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise AECompressError(f"compensated group_size {group_size!r} must divide group {group.name!r}'s width {n}")
    if any(c is None for c in stats.covariances):
        raise AECompressError(f"method 'compensated' needs the input of a linear layer for every matrix of {group.name!r}")
    budget = budget_bytes(m, n, ratio)

    def cost(k: int) -> int:
        return quantize.code_cost(m, n, k, group_size, store)

    chosen = largest_fitting(cost, budget, MAX_BITS) if bits is None else bits
    if chosen is None or cost(chosen) > budget:
        raise infeasible_bytes(group.name, m, n, ratio, cost(chosen or 1), f"compensated ({chosen or 1} bits, {dtype})")
    parts = [_member(w, h, chosen, group_size, store, damp)
             for w, h in zip(rows.split(list(stats.member_rows)), stats.covariances)]
    tensors = {"codes": quantize.packed(torch.cat([p[0] for p in parts]), chosen),
               "scale": torch.cat([p[1] for p in parts]).contiguous(),
               "zero": torch.cat([p[2] for p in parts]).contiguous()}
    return StoredForm("compensated", group, tensors,
                      meta(ratio, budget, bits=chosen, dtype=dtype, group_size=group_size, damp=damp))


METHOD = Method("compensated", decode=quantize.decode, runtime=quantize.runtime, compress=compress, needs=("covariance",))
