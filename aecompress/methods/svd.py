"""Truncated SVD: the plain factorization, ``W' = U_r S_r V_rᵀ`` at the largest rank that fits.

On a concatenated group it is one SVD of the stacked rows, so all layers share one right
basis; ``sharing="layer"`` factors each member matrix on its own.
"""

from __future__ import annotations

import torch

from aecompress.blocks.base import GroupStats, Method, choice
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
from aecompress.core.groups import WeightGroup
from aecompress.core.stored import StoredForm


def compress(
    group: WeightGroup,
    rows: torch.Tensor,
    target: Budget,
    stats: GroupStats | None = None,
    *,
    sharing: Sharing = "group",
    allocation: Allocation = "uniform",
    dtype: FloatDtype = "float32",
    codes: Codes = "dtype",
    layout: Layout = "balanced",
) -> StoredForm:
    """Truncated SVD at the largest rank that fits.

    Args:
        sharing: ``group`` factors the whole group (one right basis for all
            stacked layers); ``layer`` factors each member matrix separately.
        allocation: with ``sharing="layer"``, ``uniform`` gives every member the
            same rank; ``greedy`` spends the budget where singular values are largest.
        dtype: the stored dtype of the factors (counted at its size).
        codes: ``int3`` .. ``int8`` store ``A`` (a row of codes per weight row) as integers of
            that many bits with a float16 scale per row, buying a higher rank for the same
            bytes; ``auto`` picks the width with the least truncation plus rounding error.
        layout: ``balanced`` rescales the columns of ``A`` (and rows of ``B``) before rounding
            so the step size is spread evenly; ``plain`` rounds ``A`` as factored.
    """
    blocks = block_count(group, sharing, "svd")
    choice(allocation, ("uniform", "greedy"), "allocation", group, "svd")
    return factorize("svd", group, rows, target, sharing, allocation, dtype, [None] * blocks, [None] * blocks, {}, stats,
                      codes, layout)


METHOD = Method("svd", decode=decode_factors, runtime=build_factors, compress=compress, reported=True)
