"""Fisher-weighted SVD (Hsu et al. 2022): ``SVD(diag(c) W)``, then ``diag(1/c)``.

The row weights ``c`` come from calibration gradients (an empirical Fisher per row), so
rows the loss is sensitive to are kept more exactly.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from aecompress.blocks.base import GroupStats, Method, choice, needs_stats
from aecompress.blocks.factors import (
    Allocation,
    Codes,
    Layout,
    Sharing,
    block_count,
    build_factors,
    decode_factors,
    factorize,
)
from aecompress.core.budget import Budget
from aecompress.core.dtypes import FloatDtype
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.stored import StoredForm

Normalize = Literal["member", "group"]


def _fisher_scale(c: torch.Tensor, group: WeightGroup) -> torch.Tensor:
    c = c.double()
    if c.numel() == 0 or not torch.isfinite(c).all() or (c < 0).any():
        raise AECompressError(f"Fisher row weights for group {group.name!r} must be finite and non-negative")
    mean = c.mean()
    if mean == 0:
        warnings.warn(f"Fisher row weights of group {group.name!r} are all zero; using uniform weights", stacklevel=4)
        return torch.ones_like(c)
    return c / mean  # uniform weights become exactly 1, so fwsvd reproduces svd bit for bit


def compress(
    group: WeightGroup,
    rows: torch.Tensor,
    target: Budget,
    stats: GroupStats | None = None,
    *,
    sharing: Sharing = "group",
    allocation: Allocation = "uniform",
    normalize: Normalize = "member",
    dtype: FloatDtype = "float32",
    codes: Codes = "dtype",
    layout: Layout = "balanced",
) -> StoredForm:
    """Fisher-weighted SVD: ``SVD(diag(c) W)`` then ``diag(1/c)``, with ``c`` from ``stats.fisher``.

    Args:
        sharing: as for ``svd``.
        allocation: as for ``svd``.
        normalize: ``member`` rescales each member matrix's weights to mean 1,
            so Fisher information reorders rows within a layer but does not move
            budget between layers (per-matrix FWSVD is blind to that scale
            anyway); ``group`` keeps the raw Fisher scale across stacked layers.
        dtype: the stored dtype of the factors.
        codes: as for ``svd``.
        layout: as for ``svd``.
    """
    blocks = block_count(group, sharing, "fwsvd")
    choice(allocation, ("uniform", "greedy"), "allocation", group, "fwsvd")
    choice(normalize, ("member", "group"), "normalize", group, "fwsvd")
    stats = needs_stats(stats, "fisher", group, "fwsvd")
    weights = stats.row_weights()
    if weights.numel() != group.rows:
        raise AECompressError(f"Fisher row weights for group {group.name!r} hold {weights.numel()} rows, not {group.rows}")
    if normalize == "member" or blocks > 1:
        scales = [_fisher_scale(f, group) for f in stats.fisher]
        scales = [torch.cat(scales)] if blocks == 1 else scales
    else:
        scales = [_fisher_scale(weights, group)]
    return factorize("fwsvd", group, rows, target, sharing, allocation, dtype, scales, [None] * blocks, {}, stats,
                      codes, layout)


METHOD = Method("fwsvd", decode=decode_factors, runtime=build_factors, compress=compress, needs=("fisher",))
