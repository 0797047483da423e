"""Kronecker factorization: ``W ≈ Σ_i A_i ⊗ B_i``, the nearest sum of Kronecker products (Van Loan–Pitsianis).

``W`` (``m1·m2 x n1·n2``) is rearranged so that each ``m2 x n2`` block becomes one row of
``R`` (``m1·n1 x m2·n2``); a rank-``r`` SVD of ``R`` gives the ``r`` pairs ``(A_i, B_i)``
that minimise ``||W - Σ A_i ⊗ B_i||_F``. Stored: ``A`` (``r x m1 x n1``) and ``B``
(``r x m2 x n2``). The split of the shape is chosen among balanced divisor pairs by the
error left at the budget's rank (or given as ``shape``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aecompress.blocks.base import Built, GroupStats, Method, float_dtype, item_size, meta, offsets
from aecompress.core.budget import Budget, infeasible_bytes, largest_fitting
from aecompress.core.dtypes import FloatDtype
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.rowsource import RowSource, refer
from aecompress.core.stored import StoredForm

CANDIDATES = 8
"""How many of the most balanced shape splits are tried (each costs the singular values of ``R``)."""


def rearrange(w: torch.Tensor, m1: int, n1: int) -> torch.Tensor:
    """``R`` (``m1·n1 x m2·n2``): row ``p·n1 + j`` is block ``(p, j)`` of ``W``, read row by row."""
    m, n = w.shape
    return w.reshape(m1, m // m1, n1, n // n1).permute(0, 2, 1, 3).reshape(m1 * n1, -1)


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_i A_i ⊗ B_i`` for ``A`` (``r x m1 x n1``) and ``B`` (``r x m2 x n2``)."""
    r, m1, n1 = a.shape
    _, m2, n2 = b.shape
    return torch.einsum("rpj,rqk->pqjk", a, b).reshape(m1 * m2, n1 * n2)


def _divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]


def _shapes(m: int, n: int) -> list[tuple[int, int]]:
    """Splits ``(m1, n1)`` whose two factor sizes ``m1·n1`` and ``m2·n2`` are closest to equal."""
    pairs = [(m1, n1) for m1 in _divisors(m) for n1 in _divisors(n) if 1 < m1 * n1 < m * n]
    return sorted(pairs, key=lambda p: (abs(math.log(p[0] * p[1]) - math.log(m * n) / 2), p))[:CANDIDATES]


def _cost(rank: int, m: int, n: int, m1: int, n1: int, item: int) -> int:
    return rank * (m1 * n1 + (m // m1) * (n // n1)) * item


def compress(
    group: WeightGroup,
    rows: torch.Tensor,
    target: Budget,
    stats: GroupStats | None = None,
    *,
    shape: tuple[int, int] | None = None,
    dtype: FloatDtype = "float32",
) -> StoredForm:
    """The nearest sum of Kronecker products at the largest rank that fits.

    Args:
        shape: ``(m1, n1)``, the first factor's shape (dividing rows and width); default: the
            balanced split whose rank at this budget leaves the least error.
        dtype: the stored dtype of the factors.
    """
    store = float_dtype(dtype, group, "kronecker")
    item, m, n = item_size(store), group.rows, group.width
    budget = target.bytes(m, n)
    if shape is not None:
        m1, n1 = (int(s) for s in shape)
        if m1 < 1 or n1 < 1 or m % m1 or n % n1:
            raise AECompressError(f"kronecker shape {list(shape)} must divide group {group.name!r} ({m} x {n})")
        candidates = [(m1, n1)]
    else:
        candidates = _shapes(m, n)
    w = rows.double()
    best = None
    for m1, n1 in candidates:
        cap = min(m1 * n1, (m // m1) * (n // n1))
        rank = largest_fitting(lambda r, m1=m1, n1=n1: _cost(r, m, n, m1, n1, item), budget, cap)
        if rank is None:
            continue
        s = torch.linalg.svdvals(rearrange(w, m1, n1))
        error = float(s[rank:].pow(2).sum())
        if best is None or error < best[0]:
            best = (error, m1, n1, rank)
    if best is None:
        smallest = min(_cost(1, m, n, m1, n1, item) for m1, n1 in candidates) if candidates else m * n * item
        raise infeasible_bytes(group.name, m, n, target, smallest, f"kronecker rank 1 ({dtype})")
    _, m1, n1, rank = best
    u, s, vh = torch.linalg.svd(rearrange(w, m1, n1), full_matrices=False)
    root = s[:rank].sqrt()
    a = (u[:, :rank] * root).T.reshape(rank, m1, n1)
    b = (vh[:rank] * root.unsqueeze(1)).reshape(rank, m // m1, n // n1)
    tensors = {"A": a.to(store).contiguous(), "B": b.to(store).contiguous()}
    return StoredForm("kronecker", group, tensors, meta(target, budget, shape=[m1, n1], rank=rank, dtype=dtype))


class KroneckerFactors(nn.Module):
    """The group's ``A`` and ``B``, shared by every member's row source."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(b)


class KroneckerRows(RowSource):
    """Rows ``start .. start + rows`` of ``Σ A_i ⊗ B_i``."""

    def __init__(self, factors: KroneckerFactors, start: int, rows: int):
        super().__init__(rows, factors.A.shape[2] * factors.B.shape[2])
        self.start = start
        refer(self, "factors", factors)

    def shared(self) -> list[nn.Module]:
        return [self.factors]

    def decode(self) -> torch.Tensor:
        whole = product(self.factors.A.float(), self.factors.B.float())
        return whole[self.start : self.start + self.rows_count]


def runtime(form: StoredForm, member_rows: list[int]) -> Built:
    """One pair of factors for the group; each member reads its own rows of their product."""
    factors = KroneckerFactors(form.tensors["A"].clone(), form.tensors["B"].clone())
    return [factors], [KroneckerRows(factors, start, rows) for start, rows in zip(offsets(member_rows), member_rows)]


@torch.no_grad()
def decode(stored: StoredForm) -> torch.Tensor:
    """``Σ A_i ⊗ B_i`` in float32."""
    a, b = stored.tensors["A"], stored.tensors["B"]
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0]:
        raise AECompressError(f"group {stored.group.name!r}: kronecker factors {tuple(a.shape)} and {tuple(b.shape)} do not pair")
    (source,) = runtime(stored, [stored.group.rows])[1]
    return source.decode()


METHOD = Method("kronecker", decode=decode, runtime=runtime, compress=compress)
