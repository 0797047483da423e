"""The baselines an autoencoder must beat, each at the same stored budget.

Every method here turns a weight group's rows into a :class:`StoredForm` that
lands at or under ``budget.budget_bytes`` for the target ratio, as close to it
as the method's granularity allows, and registers a decode function so that
export, ``load_compact`` and evaluation never ask which method made a form.

- ``svd``: truncated SVD. On a concatenated group it is one SVD of the
  stacked rows, so all layers share one right basis; ``sharing="layer"``
  factors each member matrix on its own.
- ``fwsvd``: Fisher-weighted SVD (Hsu et al. 2022): ``SVD(diag(c) W)``, then
  ``diag(1/c)``, with row weights ``c`` from calibration gradients.
- ``whitened_svd``: data-aware SVD (SVD-LLM): with ``C = L Lᵀ`` the input
  covariance, ``trunc_r(W L) L⁻¹`` minimizes ``||(W - W')X||``. Per layer, or
  with one basis shared by the group under the mean covariance (Basis Sharing).
- ``prune``: magnitude pruning; positions cost a bitmask or indices, whichever is smaller.
- ``quantize``: row-wise asymmetric k-bit codes, bit-packed into uint8.

All three factorizations store ``A`` (rows x r; integer codes when ``codes`` asks,
see :mod:`aecompress.lowbit`) and ``B`` (r x width) with ``W' = A @ B``. They are
computed as ``A = (W L) V_r`` and ``B = V_rᵀ L⁻¹`` from the right singular
vectors ``V_r`` of ``diag(c) W L`` (``c`` and ``L`` are identity where a method
has none), which equals ``diag(1/c) U_r S_r`` without ever dividing by a zero
row weight.
"""

from __future__ import annotations

import heapq
import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Literal, get_args

import torch

from aecompress.budget import budget_bytes, infeasible_bytes, largest_fitting, packed_bytes
from aecompress.calibration import GroupStats
from aecompress.errors import AECompressError
from aecompress.factorize import Factorization, whitening
from aecompress.groups import WeightGroup
from aecompress.lowbit import balance, pick_bits
from aecompress.rowquant import BITS, SCALES_SUFFIX, code_bytes, pack_codes, quantize_rows, stored_values
from aecompress.stored import StoredForm, register

log = logging.getLogger(__name__)

Sharing = Literal["group", "layer"]
Allocation = Literal["uniform", "greedy"]
Normalize = Literal["member", "group"]
FloatDtype = Literal["float32", "float16", "bfloat16"]
Codes = Literal["dtype", "int3", "int4", "int5", "int6", "int7", "int8", "auto"]
CODE_CHOICES = get_args(Codes)
Layout = Literal["balanced", "plain"]
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _choice(value, valid, what: str, group: WeightGroup, method: str):
    if value not in valid:
        raise AECompressError(f"unknown {what} {value!r} for method {method!r} on group {group.name!r}; "
                              f"valid: {', '.join(map(str, valid))}")
    return value


def _float(dtype: str, group: WeightGroup, method: str) -> torch.dtype:
    return FLOAT_DTYPES[_choice(dtype, tuple(FLOAT_DTYPES), "dtype", group, method)]


def _meta(ratio: float, budget: int, **extra) -> dict:
    return {"target_ratio": ratio, "budget_bytes": budget, **extra}


# --- factorizations ----------------------------------------------------------------------------


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
    _choice(codes, CODE_CHOICES, "codes", group, method)
    return None if codes == "dtype" else 0 if codes == "auto" else int(codes.removeprefix("int"))


def _factorize(
    method: str,
    group: WeightGroup,
    rows: torch.Tensor,
    ratio: float,
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
    with a float16 scale per row (:mod:`aecompress.rowquant`), its columns balanced first
    (:mod:`aecompress.lowbit`); ``auto`` picks the width with the least truncation plus
    rounding error. ``B`` stays in ``dtype``.
    """
    store = _float(dtype, group, method)
    wanted = code_bits(codes, group, method)
    balanced = _choice(layout, ("balanced", "plain"), "layout", group, method) == "balanced"
    item = torch.empty((), dtype=store).element_size()
    budget = budget_bytes(group.rows, group.width, ratio)
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
        raise infeasible_bytes(group.name, group.rows, group.width, ratio, smallest,
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
    meta = _meta(ratio, budget, sharing=sharing, ranks=ranks, rows=[b.rows for b in blocks], dtype=dtype,
                 codes=codes if bits is None else f"int{bits}", **extra)
    if alphas:
        meta.update(layout=layout, gain_exponents=alphas)
    return StoredForm(method, group, tensors, meta)


def _block_count(group: WeightGroup, sharing: str, method: str) -> int:
    _choice(sharing, ("group", "layer"), "sharing", group, method)
    return 1 if sharing == "group" else len(group.members)


def compress_svd(
    group: WeightGroup,
    rows: torch.Tensor,
    ratio: float,
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
    blocks = _block_count(group, sharing, "svd")
    _choice(allocation, ("uniform", "greedy"), "allocation", group, "svd")
    return _factorize("svd", group, rows, ratio, sharing, allocation, dtype, [None] * blocks, [None] * blocks, {}, stats,
                      codes, layout)


def _fisher_scale(c: torch.Tensor, group: WeightGroup) -> torch.Tensor:
    c = c.double()
    if c.numel() == 0 or not torch.isfinite(c).all() or (c < 0).any():
        raise AECompressError(f"Fisher row weights for group {group.name!r} must be finite and non-negative")
    mean = c.mean()
    if mean == 0:
        warnings.warn(f"Fisher row weights of group {group.name!r} are all zero; using uniform weights", stacklevel=4)
        return torch.ones_like(c)
    return c / mean  # uniform weights become exactly 1, so fwsvd reproduces svd bit for bit


def compress_fwsvd(
    group: WeightGroup,
    rows: torch.Tensor,
    ratio: float,
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
    blocks = _block_count(group, sharing, "fwsvd")
    _choice(allocation, ("uniform", "greedy"), "allocation", group, "fwsvd")
    _choice(normalize, ("member", "group"), "normalize", group, "fwsvd")
    if stats is None or stats.fisher is None:
        raise AECompressError(
            f"method 'fwsvd' needs Fisher row weights for group {group.name!r}: "
            "collect them with aecompress.calibration.collect(..., what=('fisher',))"
        )
    weights = stats.row_weights()
    if weights.numel() != group.rows:
        raise AECompressError(f"Fisher row weights for group {group.name!r} hold {weights.numel()} rows, not {group.rows}")
    if normalize == "member" or blocks > 1:
        scales = [_fisher_scale(f, group) for f in stats.fisher]
        scales = [torch.cat(scales)] if blocks == 1 else scales
    else:
        scales = [_fisher_scale(weights, group)]
    return _factorize("fwsvd", group, rows, ratio, sharing, allocation, dtype, scales, [None] * blocks, {}, stats,
                      codes, layout)


def compress_whitened_svd(
    group: WeightGroup,
    rows: torch.Tensor,
    ratio: float,
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
    blocks = _block_count(group, sharing, "whitened_svd")
    _choice(allocation, ("uniform", "greedy"), "allocation", group, "whitened_svd")
    if not damp >= 0:
        raise AECompressError(f"damp must be a non-negative number, got {damp!r}")
    if stats is None or stats.covariances is None:
        raise AECompressError(
            f"method 'whitened_svd' needs input covariances for group {group.name!r}: "
            "collect them with aecompress.calibration.collect(..., what=('covariance',))"
        )
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
    return _factorize("whitened_svd", group, rows, ratio, sharing, allocation, dtype, [None] * blocks, chols,
                      {"damp": used, "tokens": stats.tokens}, stats, codes, layout)


@register("svd")
@register("fwsvd")
@register("whitened_svd")
@torch.no_grad()
def decode_factors(stored: StoredForm) -> torch.Tensor:
    """``A @ B`` in float32, stacking members for per-layer factors."""
    t = stored.tensors
    if "A" in t:
        return stored_values(t, "A", t["B"].shape[0]) @ t["B"].float()
    count = len(stored.meta["ranks"])
    return torch.cat([stored_values(t, f"A.{i}", t[f"B.{i}"].shape[0]) @ t[f"B.{i}"].float() for i in range(count)])


# --- pruning -------------------------------------------------------------------------------------


def index_dtype(largest: int) -> torch.dtype:
    """The smallest integer dtype that stores values in ``0..largest``."""
    if largest <= 255:
        return torch.uint8
    if largest <= 32767:
        return torch.int16
    return torch.int32


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a flat 0/1 tensor into uint8, eight per byte, first element in the lowest bit."""
    pad = (-bits.numel()) % 8
    flat = torch.cat([bits.flatten().to(torch.int32), torch.zeros(pad, dtype=torch.int32)])
    return (flat.view(-1, 8) << torch.arange(8, dtype=torch.int32)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as uint8 0/1."""
    bits = (packed.to(torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.flatten()[:count].to(torch.uint8)


def position_costs(rows: int, width: int, kept: int) -> dict[str, int]:
    """Bytes to store which ``kept`` of ``rows x width`` positions survive, per encoding."""
    total = rows * width
    return {
        "bitmask": packed_bytes(total, 1),
        "index": kept * _size(index_dtype(total - 1)),
        "row_index": kept * _size(index_dtype(width - 1)) + rows * _size(index_dtype(width)),
    }


def compress_prune(
    group: WeightGroup,
    rows: torch.Tensor,
    ratio: float,
    stats: GroupStats | None = None,
    *,
    dtype: FloatDtype = "float32",
) -> StoredForm:
    """Magnitude pruning: keep the largest-magnitude weights of the group.

    Kept values are stored in row-major order; their positions cost the
    cheapest of a packed bitmask, flat indices, or per-row column indices plus
    per-row counts (each index at the smallest integer dtype that holds it).

    Args:
        dtype: the stored dtype of the kept values.
    """
    store = _float(dtype, group, "prune")
    m, n = group.rows, group.width
    budget = budget_bytes(m, n, ratio)
    item = _size(store)

    def cost(k: int) -> int:
        return k * item + min(position_costs(m, n, k).values())

    kept = largest_fitting(cost, budget, m * n)
    if kept is None:
        raise infeasible_bytes(group.name, m, n, ratio, cost(1), f"prune ({dtype} values)")
    costs = position_costs(m, n, kept)
    encoding = min(costs, key=lambda k: (costs[k], list(costs).index(k)))
    flat = rows.flatten()
    positions = torch.topk(flat.abs(), kept, sorted=False).indices.sort().values
    tensors = {"values": flat[positions].to(store).contiguous()}
    if encoding == "bitmask":
        mask = torch.zeros(m * n, dtype=torch.uint8)
        mask[positions] = 1
        tensors["mask"] = pack_bits(mask)
    elif encoding == "index":
        tensors["index"] = positions.to(index_dtype(m * n - 1))
    else:
        tensors["columns"] = (positions % n).to(index_dtype(n - 1))
        tensors["counts"] = torch.bincount(positions // n, minlength=m).to(index_dtype(n))
    return StoredForm("prune", group, tensors, _meta(ratio, budget, kept=kept, positions=encoding, dtype=dtype))


@register("prune")
@torch.no_grad()
def decode_prune(stored: StoredForm) -> torch.Tensor:
    """Scatter the kept values into a zero matrix."""
    m, n = stored.group.rows, stored.group.width
    t = stored.tensors
    values = t["values"].float()
    if "mask" in t:
        positions = unpack_bits(t["mask"], m * n).bool().nonzero().flatten()
    elif "index" in t:
        positions = t["index"].long()
    else:
        counts = t["counts"].long()
        positions = torch.repeat_interleave(torch.arange(m), counts) * n + t["columns"].long()
    if positions.numel() != values.numel() or (positions.numel() and int(positions.max()) >= m * n):
        raise AECompressError(f"group {stored.group.name!r}: pruned positions do not match the stored values")
    out = torch.zeros(m * n, dtype=torch.float32)
    out[positions] = values
    return out.view(m, n)


# --- quantization --------------------------------------------------------------------------------

MAX_BITS = 8


def compress_quantize(
    group: WeightGroup,
    rows: torch.Tensor,
    ratio: float,
    stats: GroupStats | None = None,
    *,
    bits: int | None = None,
    dtype: FloatDtype = "float32",
) -> StoredForm:
    """Row-wise asymmetric k-bit quantization: ``W' = zero + scale * code``.

    Args:
        bits: code width in 1..8; ``None`` takes the largest that fits the budget.
        dtype: the stored dtype of each row's scale and zero point.
    """
    store = _float(dtype, group, "quantize")
    m, n = group.rows, group.width
    budget = budget_bytes(m, n, ratio)

    def cost(k: int) -> int:
        return packed_bytes(m * n, k) + 2 * m * _size(store)

    if bits is None:
        bits = largest_fitting(cost, budget, MAX_BITS)
        if bits is None:
            raise infeasible_bytes(group.name, m, n, ratio, cost(1), f"quantize (1 bit, {dtype} scales)")
    elif not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise AECompressError(f"bits must be an integer in 1..{MAX_BITS} for group {group.name!r}, got {bits!r}")
    elif cost(bits) > budget:
        raise infeasible_bytes(group.name, m, n, ratio, cost(bits), f"quantize ({bits} bits, {dtype} scales)")
    levels = 2**bits - 1
    w = rows.float()
    low, high = w.min(dim=1).values, w.max(dim=1).values
    zero = low.to(store)
    scale = ((high - low) / levels).to(store)
    # Codes are chosen against the stored (rounded) scale and zero, so decode is their best fit.
    z, s = zero.float().unsqueeze(1), scale.float().unsqueeze(1)
    codes = torch.where(s > 0, torch.round((w - z) / torch.where(s > 0, s, 1)), 0).clamp(0, levels).to(torch.int32)
    stream = (codes.flatten().unsqueeze(1) >> torch.arange(bits, dtype=torch.int32)) & 1
    tensors = {"codes": pack_bits(stream.flatten()), "scale": scale.contiguous(), "zero": zero.contiguous()}
    return StoredForm("quantize", group, tensors, _meta(ratio, budget, bits=bits, dtype=dtype))


@register("quantize")
@torch.no_grad()
def decode_quantize(stored: StoredForm) -> torch.Tensor:
    """Unpack the codes and map them back through each row's scale and zero point."""
    m, n = stored.group.rows, stored.group.width
    bits = int(stored.meta["bits"])
    t = stored.tensors
    if t["codes"].numel() != packed_bytes(m * n, bits):
        raise AECompressError(f"group {stored.group.name!r}: {bits}-bit codes do not match the matrix size")
    stream = unpack_bits(t["codes"], m * n * bits).view(m * n, bits).to(torch.int32)
    codes = (stream << torch.arange(bits, dtype=torch.int32)).sum(dim=1).view(m, n)
    return t["zero"].float().unsqueeze(1) + t["scale"].float().unsqueeze(1) * codes.float()


# --- the one entry point -------------------------------------------------------------------------

Compressor = Callable[..., StoredForm]
COMPRESSORS: dict[str, Compressor] = {
    "svd": compress_svd,
    "fwsvd": compress_fwsvd,
    "whitened_svd": compress_whitened_svd,
    "prune": compress_prune,
    "quantize": compress_quantize,
}
NEEDS = {"fwsvd": "fisher", "whitened_svd": "covariance"}


def options(method: str) -> dict[str, object]:
    """A method's options and their defaults."""
    params = inspect.signature(COMPRESSORS[method]).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def compress(
    method: str,
    group: WeightGroup,
    rows: torch.Tensor,
    ratio: float,
    stats: GroupStats | None = None,
    **opts,
) -> StoredForm:
    """Compress one weight group with a baseline method at a target ratio.

    Args:
        method: one of ``COMPRESSORS`` (svd, fwsvd, whitened_svd, prune, quantize).
        group: the weight group.
        rows: ``groups.extract_rows(model, group)``: float32, rows x width.
        ratio: target compression ratio, original float32 bytes over stored bytes.
        stats: calibration statistics of the group (fwsvd: fisher; whitened_svd: covariance).
        **opts: the method's options (see :func:`options`).

    Returns:
        A stored form at or under the byte budget; ``meta`` records what was chosen.

    Raises:
        AECompressError: for an unknown method or option, or a ratio the method
            cannot reach (the message gives the feasible range).
    """
    if method not in COMPRESSORS:
        raise AECompressError(
            f"unknown compression method {method!r}; valid: {', '.join(COMPRESSORS)} "
            "(the autoencoder, ae, is trained with `aecompress fit`)"
        )
    valid = options(method)
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise AECompressError(f"unknown option {unknown[0]!r} for method {method!r}; valid: {', '.join(valid) or '(none)'}")
    if tuple(rows.shape) != (group.rows, group.width):
        raise AECompressError(f"group {group.name!r} has shape {(group.rows, group.width)}, got rows {tuple(rows.shape)}")
    if not torch.isfinite(rows).all():
        raise AECompressError(f"group {group.name!r} holds NaN or inf weights; fix the checkpoint before compressing")
    budget = budget_bytes(group.rows, group.width, ratio)
    form = COMPRESSORS[method](group, rows.detach().cpu().float(), ratio, stats, **opts)
    if form.bytes > budget:  # the accountant is the judge; a compressor that overspends is a bug
        raise RuntimeError(f"{method} stored {form.bytes} bytes for {group.name!r}, over its budget of {budget}")
    log.info("%s on %s: %d bytes (budget %d), ratio %.3f (target %.3f)",
             method, group.name, form.bytes, budget, form.ratio, ratio)
    return form
