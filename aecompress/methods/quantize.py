"""Round-to-nearest quantization per row: ``W' = zero + scale * code``, codes bit-packed.

Each row (or group of columns) gets an asymmetric k-bit grid, stored as a scale and a zero point
in ``dtype``. The grid is either the run's own minimum and maximum (``minmax``), or the range,
shrunk towards zero from those ends, whose rounding error is least (``mse``): at two or three bits
one large weight stretches a min-max grid so far that most weights share one or two codes, and
clipping it buys resolution for the rest. Both store exactly the same tensors.

The zero point is stored either as a float (``zeros: float``) or as an integer code on the run's own
grid (``zeros: int``, ``W' = scale * (code - zero_code)``, the zero code as wide as the run's
codes, as GPTQ stores it): at 64 to 96 columns per run a float16 zero costs a quarter of a bit per
weight, which an integer zero gives back to the codes.
"""

from __future__ import annotations

import torch
from torch import nn

from aecompress.blocks.base import Built, GroupStats, Method, float_dtype, meta, offsets
from aecompress.blocks.grids import (
    MAX_BITS,
    block_rows,
    check_grid,
    code_cost,
    codes_of,
    dequantized,
    fitted,
    grid_codes,
    rounded,
    stored,
    zeros_of,
)
from aecompress.blocks.int4_kernel import FusedRows
from aecompress.core.bits import bit_slice
from aecompress.core.budget import Budget, infeasible_bytes, largest_fitting, packed_bytes
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
    code_bits: int | None = None,
    dtype: FloatDtype = "float32",
    group_size: int | None = None,
    grid: str = "minmax",
    zeros: str = "float",
) -> StoredForm:
    """Asymmetric k-bit round-to-nearest quantization: ``W' = zero + scale * code``, per row or per group of columns.

    Args:
        code_bits: code width in 1..8; ``None`` takes the largest that fits the budget (formerly ``bits``).
        dtype: the stored dtype of each scale and zero point.
        group_size: columns sharing one scale and zero point (e.g. 64, as GPTQ and HQQ use);
            ``None``: one per row. Must divide the width.
        grid: ``minmax`` (each run's own range) or ``mse`` (the clipped range with least rounding error).
        zeros: ``float`` (a zero point in ``dtype``) or ``int`` (a zero code as wide as the codes, on the grid).
    """
    store = float_dtype(dtype, group, "quantize")
    kind = check_grid(grid, "quantize", zeros)
    m, n = group.rows, group.width
    budget = target.bytes(m, n)
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1 or n % group_size):
        raise AECompressError(f"quantize group_size {group_size!r} must divide group {group.name!r}'s width {n}")
    g = group_size or n

    def cost(k: int) -> int:
        return code_cost(m, n, k, g, store, zeros)

    bits = code_bits
    if bits is None:
        bits = largest_fitting(cost, budget, MAX_BITS)
        if bits is None:
            raise infeasible_bytes(group.name, m, n, target, cost(1), f"quantize (1 bit, {dtype} scales)")
    elif not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise AECompressError(f"code_bits must be an integer in 1..{MAX_BITS} for group {group.name!r}, got {bits!r}")
    elif cost(bits) > budget:
        raise infeasible_bytes(group.name, m, n, target, cost(bits), f"quantize ({bits} bits, {dtype} scales)")
    levels = 2**bits - 1
    w = rows.float().reshape(m, n // g, g)
    scale, zero = fitted(w, levels, store, kind, zeros)
    # Codes are chosen against the stored (rounded) scale and zero, so decode is their best fit.
    codes = rounded(w, scale.unsqueeze(2), zero.unsqueeze(2), levels).to(torch.int32)
    if group_size is None:  # one scale per row: the layout stored before groups existed
        scale, zero = scale.squeeze(1), zero.squeeze(1)
    tensors = stored(codes, bits, scale, zero, zeros)
    extra = ({} if group_size is None else {"group_size": group_size}) | ({} if kind == "minmax" else {"grid": kind}) \
        | ({} if zeros == "float" else {"zeros": zeros})
    return StoredForm("quantize", group, tensors, meta(target, budget, bits=bits, dtype=dtype, **extra))


class QuantizedRows(FusedRows):
    """Packed k-bit codes with per-row scale and zero point (both trainable)."""

    def __init__(self, rows: int, width: int, bits: int, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        super().__init__(rows, width)
        self.bits = bits
        self.register_buffer("codes", codes)
        self.scale = nn.Parameter(scale)
        self.zero = nn.Parameter(zero)
        self.chunk_rows = block_rows(rows, width)

    def decode(self) -> torch.Tensor:
        return self.decode_rows(0, self.rows_count)

    def decode_rows(self, start: int, stop: int) -> torch.Tensor:
        n = self.width
        codes = codes_of(self.codes, start * n, (stop - start) * n, self.bits).view(stop - start, n)
        return dequantized(codes, self.scale[start:stop], self.zero[start:stop])

    def code_width(self) -> int:
        return self.bits

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = codes_of(self.codes, 0, self.rows_count * self.width, self.bits).view(self.rows_count, self.width)
        return codes, self.scale.detach(), self.zero.detach()


def runtime(form: StoredForm, member_rows: list[int]) -> Built:
    """Each member keeps its rows' packed codes, scales and zero points."""
    t, n, bits = form.tensors, form.group.width, int(form.meta["bits"])
    runs = t["scale"][0].numel() if t["scale"].dim() > 1 else 1
    sources = [
        QuantizedRows(m, n, bits, bit_slice(t["codes"], r0 * n * bits, m * n * bits), t["scale"][r0 : r0 + m].clone(),
                      t["zero"][r0 : r0 + m].clone() if "zero" in t
                      else zeros_of(t, t["scale"][r0 : r0 + m], r0 * runs, m * runs, bits))
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


METHOD = Method("quantize", decode=decode, runtime=runtime, compress=compress, tunable=True, renamed={"bits": "code_bits"},
                codes=grid_codes)
