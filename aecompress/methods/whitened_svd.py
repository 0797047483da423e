"""Whitened (data-aware) SVD, as in SVD-LLM: ``trunc_r(W L) L⁻¹`` with ``L Lᵀ`` the input covariance.

It minimizes ``||(W - W') X||`` over the calibration inputs ``X`` rather than the raw weight
distance. Per layer (each member whitened by its own covariance), or with one basis shared by
the group under the members' mean covariance (Basis Sharing).
"""

from __future__ import annotations

import torch

from aecompress.blocks.base import GroupStats, Method, choice, needs_stats
from aecompress.blocks.factorize import whitening
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


def compress(
    group: WeightGroup,
    rows: torch.Tensor,
    target: Budget,
    stats: GroupStats | None = None,
    *,
    sharing: Sharing = "group",
    allocation: Allocation = "uniform",
    damp: float = 1e-3,
    dtype: FloatDtype = "float32",
    codes: Codes = "dtype",
    layout: Layout = "balanced",
) -> StoredForm:
    """Whitened (data-aware) SVD: ``trunc_r(W L) L⁻¹`` with ``L Lᵀ`` the input covariance.

    Args:
        sharing: ``group`` shares one basis across the group, whitened by the
            members' mean covariance (Basis Sharing); ``layer`` whitens and
            factors each member with its own covariance, at the same total budget.
        allocation: with ``sharing="layer"``, ``uniform`` ranks or ``greedy``
            allocation by whitened singular values.
        damp: ridge added to the covariance, relative to its mean diagonal. At
            least 1e-2 is used when there are fewer tokens than input dimensions.
        dtype: the stored dtype of the factors.
        codes: as for ``svd``.
        layout: as for ``svd``.
    """
    blocks = block_count(group, sharing, "whitened_svd")
    choice(allocation, ("uniform", "greedy"), "allocation", group, "whitened_svd")
    if not damp >= 0:
        raise AECompressError(f"damp must be a non-negative number, got {damp!r}")
    stats = needs_stats(stats, "covariance", group, "whitened_svd")
    missing = [m.param for m, c in zip(group.members, stats.covariances) if c is None]
    if missing:
        raise AECompressError(
            f"method 'whitened_svd' needs the input of a linear layer, but {missing[0]!r} in group "
            f"{group.name!r} is not one (an embedding?); use svd or fwsvd for it"
        )
    covs = [stats.mean_covariance()] if blocks == 1 else list(stats.covariances)
    whitened = [whitening(c, damp, stats.tokens, group.name) for c in covs]
    chols = [w[0] for w in whitened]
    used = max(w[1] for w in whitened)
    return factorize("whitened_svd", group, rows, target, sharing, allocation, dtype, [None] * blocks, chols,
                      {"damp": used, "tokens": stats.tokens}, stats, codes, layout)


METHOD = Method("whitened_svd", decode=decode_factors, runtime=build_factors, compress=compress, needs=("covariance",),
                reported=True)
