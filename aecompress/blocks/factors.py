"""The stored form the factorizations share: ``W' = A @ B``, sized, stored, decoded and run.

svd, fwsvd and whitened_svd differ only in the row scales and whitening they factor with
(:class:`~aecompress.blocks.factorize.Factorization`); how many ranks fit the budget, how
``A`` is stored (float, or 3- to 8-bit codes with balanced columns, see
:mod:`aecompress.blocks.lowbit`), how the form decodes and how it runs per layer are here,
once. ``A`` is computed as ``A = (W L) V_r`` and ``B = V_rᵀ L⁻¹`` from the right singular
vectors ``V_r`` of ``diag(c) W L`` (``c`` and ``L`` are identity where a method has none),
which equals ``diag(1/c) U_r S_r`` without ever dividing by a zero row weight.
"""

from __future__ import annotations

import heapq
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from aecompress.blocks.base import Built, GroupStats, choice, float_dtype, item_size, meta
from aecompress.blocks.factorize import Factorization
from aecompress.blocks.lowbit import balance, pick_bits
from aecompress.core.budget import Budget, infeasible_bytes, largest_fitting
from aecompress.core.codes import BITS, SCALES_SUFFIX, code_bytes, pack_codes, quantize_rows, runtime_values
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.rowsource import RowSource, refer
from aecompress.core.stored import StoredForm

Sharing = Literal["group", "layer"]
Allocation = Literal["uniform", "greedy"]
Codes = Literal["dtype", "int3", "int4", "int5", "int6", "int7", "int8", "auto"]
CODE_CHOICES = get_args(Codes)
Layout = Literal["balanced", "plain"]


def factor_bytes(rows: int, width: int, rank: int, item: int, bits: int | None) -> int:
    """Bytes of one block's factors: ``A`` as float codes (``bits`` None) or integer codes, plus ``B``."""
    codes = rows * rank * item if bits is None else code_bytes(rows, rank, bits)
    return codes + rank * width * item


def _ranks(blocks: list[Factorization], width: int, budget: int, item: int, allocation: str,
           bits: int | None) -> list[int] | None:
    """Ranks per block whose factors fit the budget; None if rank 1 everywhere does not.

    Costs come from :func:`factor_bytes`, exactly as the accountant will count the tensors.
    """
    caps = [min(b.rows, width) for b in blocks]

    def cost(i: int, rank: int) -> int:
        return factor_bytes(blocks[i].rows, width, rank, item, bits)

    uniform = largest_fitting(lambda r: sum(cost(i, r) for i in range(len(blocks))), budget, min(caps))
    if uniform is None:
        return None
    if allocation == "uniform" or len(blocks) == 1:
        return [uniform] * len(blocks)
    # Greedy: each added rank buys its squared singular value for its cost;
    # singular values fall, so with linear costs taking the best value per byte
    # first is optimal up to the last, partially affordable step. Bit-plane codes
    # make every eighth rank dearer, so greedy is kept only where it retains more.
    def key(i: int, rank: int) -> tuple[float, int]:
        return (-float(blocks[i].s[rank] ** 2) / (cost(i, rank + 1) - cost(i, rank)), i)

    ranks = [1] * len(blocks)
    spent = sum(cost(i, 1) for i in range(len(blocks)))
    heap = [key(i, 1) for i in range(len(blocks)) if caps[i] > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        extra = cost(i, ranks[i] + 1) - cost(i, ranks[i])
        if spent + extra > budget:
            continue  # another block may still be cheaper
        spent += extra
        ranks[i] += 1
        if ranks[i] < caps[i]:
            heapq.heappush(heap, key(i, ranks[i]))

    def kept(rs: list[int]) -> float:
        return sum(float(b.s[:r].double().pow(2).sum()) for b, r in zip(blocks, rs))

    return ranks if kept(ranks) >= kept([uniform] * len(blocks)) else [uniform] * len(blocks)


def _member_slices(group: WeightGroup, rows: torch.Tensor, stats: GroupStats | None) -> list[torch.Tensor]:
    """Each member's rows; sizes come from the statistics, else members are taken to be equal."""
    count = len(group.members)
    sizes = list(stats.member_rows) if stats is not None and stats.member_rows else [rows.shape[0] // count] * count
    if len(sizes) != count or sum(sizes) != rows.shape[0]:
        raise AECompressError(
            f"cannot split group {group.name!r} into its {count} matrices (rows {rows.shape[0]}); "
            "pass calibration statistics or use sharing='group'"
        )
    return list(rows.split(sizes))


def code_bits(codes: str, group: WeightGroup, method: str) -> int | None:
    """The bit width a ``codes`` option names: None for float codes, 0 for ``auto``, else 3..8."""
    choice(codes, CODE_CHOICES, "codes", group, method)
    return None if codes == "dtype" else 0 if codes == "auto" else int(codes.removeprefix("int"))


def factorize(
    method: str,
    group: WeightGroup,
    rows: torch.Tensor,
    target: Budget,
    sharing: str,
    allocation: str,
    dtype: str,
    row_scales: list[torch.Tensor | None],
    chols: list[torch.Tensor | None],
    extra: dict,
    stats: GroupStats | None,
    codes: str = "dtype",
    layout: str = "balanced",
) -> StoredForm:
    """Shared by svd, fwsvd and whitened_svd: choose code width and ranks, then store ``A`` and ``B``.

    With integer ``codes``, ``A`` (one row of codes per weight row) is stored in that many bits
    with a float16 scale per row (:mod:`aecompress.core.codes`), its columns balanced first
    (:mod:`aecompress.blocks.lowbit`); ``auto`` picks the width with the least truncation plus
    rounding error. ``B`` stays in ``dtype``.
    """
    store = float_dtype(dtype, group, method)
    wanted = code_bits(codes, group, method)
    balanced = choice(layout, ("balanced", "plain"), "layout", group, method) == "balanced"
    item = item_size(store)
    budget = target.bytes(group.rows, group.width)
    w = rows.double()
    parts = [w] if sharing == "group" else _member_slices(group, w, stats)
    blocks = [Factorization(part, scale, chol) for part, scale, chol in zip(parts, row_scales, chols)]
    widths = BITS if wanted == 0 else (wanted,)
    fitting = {bits: _ranks(blocks, group.width, budget, item, allocation, bits) for bits in widths}
    fitting = {bits: ranks for bits, ranks in fitting.items() if ranks is not None}
    if not fitting:
        def smallest_at(bits: int | None) -> int:
            return sum(factor_bytes(b.rows, group.width, 1, item, bits) for b in blocks)

        bits = min(BITS, key=smallest_at) if wanted == 0 else wanted  # auto: the cheapest width at rank 1
        smallest = smallest_at(bits)
        raise infeasible_bytes(group.name, group.rows, group.width, target, smallest,
                               f"{method} rank 1 ({dtype}{f', {bits}-bit codes' if bits else ''})")
    bits = next(iter(fitting)) if len(fitting) == 1 else pick_bits(
        {b: list(zip(blocks, ranks)) for b, ranks in fitting.items()}, balanced)
    ranks = fitting[bits]
    tensors: dict[str, torch.Tensor] = {}
    alphas = []
    for i, (block, rank) in enumerate(zip(blocks, ranks)):
        suffix = "" if sharing == "group" else f".{i}"
        if bits is None:
            a, b = block.factors(rank, store)
            tensors[f"A{suffix}"] = a
        else:
            a, b, alpha, _ = balance(*block.factors(rank, torch.float32), bits, block.row_scale, balanced)
            q, tensors[f"A{suffix}{SCALES_SUFFIX}"] = quantize_rows(a, bits)
            tensors[f"A{suffix}"] = pack_codes(q, bits)
            b = b.to(store).contiguous()
            alphas.append(alpha)
        tensors[f"B{suffix}"] = b
    info = meta(target, budget, sharing=sharing, ranks=ranks, rows=[b.rows for b in blocks], dtype=dtype,
                 codes=codes if bits is None else f"int{bits}", **extra)
    if alphas:
        info.update(layout=layout, gain_exponents=alphas)
    return StoredForm(method, group, tensors, info)


def block_count(group: WeightGroup, sharing: str, method: str) -> int:
    choice(sharing, ("group", "layer"), "sharing", group, method)
    return 1 if sharing == "group" else len(group.members)


class Basis(nn.Module):
    """The right factor ``B`` (rank x width), shared by a group or owned by one member."""

    def __init__(self, b: torch.Tensor):
        super().__init__()
        self.B = nn.Parameter(b)


class FactorRows(RowSource):
    """``A`` (rows x rank) of one member and a basis ``B``: applied as two matmuls."""

    def __init__(self, a: torch.Tensor, basis: Basis):
        super().__init__(a.shape[0], basis.B.shape[1])
        self.A = nn.Parameter(a)
        refer(self, "basis", basis)

    def shared(self) -> list[nn.Module]:
        return [self.basis]

    def decode(self) -> torch.Tensor:
        return self.A.float() @ self.basis.B.float()

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``(x @ Bᵀ) @ Aᵀ``: r·(in + out) multiply-adds per token instead of in·out."""
        return F.linear(F.linear(x, self.basis.B.to(x.dtype)), self.A.to(x.dtype), bias)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.A) @ self.basis.B.to(self.A.dtype)


def build_factors(form: StoredForm, member_rows: list[int]) -> Built:
    """A shared basis ``B`` with per-member slices of ``A``, or per-member ``A.i``, ``B.i``."""
    t = form.tensors
    if "A" in t:
        basis = Basis(t["B"].clone())
        return [basis], [FactorRows(a.clone(), basis) for a in runtime_values(t, "A", t["B"].shape[0]).split(member_rows)]
    count = len(form.meta["ranks"])
    if count != len(member_rows):
        raise AECompressError(
            f"group {form.group.name!r} stores {count} factor pairs for {len(member_rows)} matrices; it cannot run per layer"
        )
    bases = [Basis(t[f"B.{i}"].clone()) for i in range(count)]
    return bases, [FactorRows(runtime_values(t, f"A.{i}", t[f"B.{i}"].shape[0]).clone(), b) for i, b in enumerate(bases)]


@torch.no_grad()
def decode_factors(stored: StoredForm) -> torch.Tensor:
    """``A @ B`` in float32, through the same row sources the run-time form uses (members stacked)."""
    blocks = [stored.group.rows] if "A" in stored.tensors else list(stored.meta["rows"])
    return torch.cat([source.decode() for source in build_factors(stored, blocks)[1]])
