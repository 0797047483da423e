"""Round-to-nearest quantization per row: ``W' = zero + scale * code``, codes bit-packed.

Each row gets an asymmetric k-bit grid from its own minimum and maximum; scale and zero
point are stored per row in ``dtype``.
"""

from __future__ import annotations

import torch
from torch import nn

from aecompress.core.bits import bit_slice, pack_bits, unpack_bits
from aecompress.core.budget import budget_bytes, infeasible_bytes, largest_fitting, packed_bytes
from aecompress.core.dtypes import FloatDtype
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.rowsource import RowSource
from aecompress.core.stored import StoredForm
from aecompress.methods.base import Built, GroupStats, Method, float_dtype, item_size, meta, offsets

MAX_BITS = 8


def code_cost(rows: int, width: int, bits: int, group_size: int, store: torch.dtype) -> int:
    """Bytes of ``bits``-bit codes packed end to end, plus a scale and a zero per ``group_size`` columns of each row."""
    return packed_bytes(rows * width, bits) + 2 * rows * (width // group_size) * item_size(store)


def packed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``0 .. 2^bits - 1`` as the one packed bit stream (each code's bits, lowest first)."""
    stream = (codes.flatten().to(torch.int32).unsqueeze(1) >> torch.arange(bits, dtype=torch.int32)) & 1
    return pack_bits(stream.flatten())


def unpacked(stream: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`packed`: the first ``count`` codes of a stream, as int32."""
    weights = torch.arange(bits, dtype=torch.int32, device=stream.device)
    return (unpack_bits(stream, count * bits).view(count, bits).to(torch.int32) << weights).sum(dim=1, dtype=torch.int32)


def grid(w: torch.Tensor, levels, store: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored scale and zero of each run of ``w``'s last dimension: its range over ``levels`` steps, and its minimum."""
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    return ((high - low) / levels).to(store), low.to(store)


def rounded(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels) -> torch.Tensor:
    """The nearest codes ``0 .. levels`` of ``w`` on the stored grid (a flat range gets code 0); ``levels`` may vary by row."""
    s, z = scale.float(), zero.float()
    codes = torch.where(s > 0, torch.round((w - z) / torch.where(s > 0, s, 1)), 0).clamp(min=0)
    return torch.minimum(codes, torch.as_tensor(levels, dtype=codes.dtype, device=codes.device))


def dequantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``zero + scale * code`` for (rows x width) codes, with one scale and zero per row or per group of columns."""
    m, n = codes.shape
    if scale.dim() == 1:
        return zero.float().unsqueeze(1) + scale.float().unsqueeze(1) * codes.float()
    grouped = codes.float().view(m, scale.shape[1], -1)
    return (zero.float().unsqueeze(2) + scale.float().unsqueeze(2) * grouped).reshape(m, n)


def compress(
    group: WeightGroup,
    rows: torch.Tensor,
    ratio: float,
    stats: GroupStats | None = None,
    *,
    bits: int | None = None,
    dtype: FloatDtype = "float32",
    group_size: int | None = None,
) -> StoredForm:
    """Asymmetric k-bit round-to-nearest quantization: ``W' = zero + scale * code``, per row or per group of columns.

    Args:
        bits: code width in 1..8; ``None`` takes the largest that fits the budget.
        dtype: the stored dtype of each scale and zero point.
        group_size: columns sharing one scale and zero point (e.g. 64, as GPTQ and HQQ use);
            ``None``: one per row. Must divide the width.
    """
    store = float_dtype(dtype, group, "quantize")
    m, n = group.rows, group.width
    budget = budget_bytes(m, n, ratio)
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1 or n % group_size):
        raise AECompressError(f"quantize group_size {group_size!r} must divide group {group.name!r}'s width {n}")
    g = group_size or n

    def cost(k: int) -> int:
        return code_cost(m, n, k, g, store)

    if bits is None:
        bits = largest_fitting(cost, budget, MAX_BITS)
        if bits is None:
            raise infeasible_bytes(group.name, m, n, ratio, cost(1), f"quantize (1 bit, {dtype} scales)")
    elif not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise AECompressError(f"bits must be an integer in 1..{MAX_BITS} for group {group.name!r}, got {bits!r}")
    elif cost(bits) > budget:
        raise infeasible_bytes(group.name, m, n, ratio, cost(bits), f"quantize ({bits} bits, {dtype} scales)")
    levels = 2**bits - 1
    w = rows.float().reshape(m, n // g, g)
    scale, zero = grid(w, levels, store)
    # Codes are chosen against the stored (rounded) scale and zero, so decode is their best fit.
    codes = rounded(w, scale.unsqueeze(2), zero.unsqueeze(2), levels).to(torch.int32)
    if group_size is None:  # one scale per row: the layout stored before groups existed
        scale, zero = scale.squeeze(1), zero.squeeze(1)
    tensors = {"codes": packed(codes, bits), "scale": scale.contiguous(), "zero": zero.contiguous()}
    extra = {} if group_size is None else {"group_size": group_size}
    return StoredForm("quantize", group, tensors, meta(ratio, budget, bits=bits, dtype=dtype, **extra))


class QuantizedRows(RowSource):
    """Packed k-bit codes with per-row scale and zero point (both trainable)."""

    def __init__(self, rows: int, width: int, bits: int, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        super().__init__(rows, width)
        self.bits = bits
        self.register_buffer("codes", codes)
        self.scale = nn.Parameter(scale)
        self.zero = nn.Parameter(zero)

    def decode(self) -> torch.Tensor:
        m, n = self.rows_count, self.width
        return dequantized(unpacked(self.codes, m * n, self.bits).view(m, n), self.scale, self.zero)


def runtime(form: StoredForm, member_rows: list[int]) -> Built:
    """Each member keeps its rows' packed codes, scales and zero points."""
    t, n, bits = form.tensors, form.group.width, int(form.meta["bits"])
    sources = [
        QuantizedRows(m, n, bits, bit_slice(t["codes"], r0 * n * bits, m * n * bits),
                      t["scale"][r0 : r0 + m].clone(), t["zero"][r0 : r0 + m].clone())
        for r0, m in zip(offsets(member_rows), member_rows)
    ]
    return [], sources



@torch.no_grad()
def decode(stored: StoredForm) -> torch.Tensor:
    """Unpack the codes and map them through each row's scale and zero point (one source holding every row)."""
    m, n, bits = stored.group.rows, stored.group.width, int(stored.meta["bits"])
    if stored.tensors["codes"].numel() != packed_bytes(m * n, bits):
        raise AECompressError(f"group {stored.group.name!r}: {bits}-bit codes do not match the matrix size")
    (source,) = runtime(stored, [m])[1]
    return source.decode()


METHOD = Method("quantize", decode=decode, runtime=runtime, compress=compress)
