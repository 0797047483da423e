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

from aecompress.core.bits import bit_slice, pack_bits, unpack_bits
from aecompress.core.budget import Budget, infeasible_bytes, largest_fitting, packed_bytes
from aecompress.core.dtypes import FloatDtype
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.rowsource import RowSource
from aecompress.core.stored import StoredForm
from aecompress.methods.base import Built, GroupStats, Method, float_dtype, item_size, meta, offsets

MAX_BITS = 8
GRIDS = ("minmax", "mse")
ZEROS = ("float", "int")
SHRINK = torch.linspace(1.0, 0.4, 25)
"""Fractions of a run's min-max range that the ``mse`` grid tries (both ends scaled towards zero)."""


def code_cost(rows: int, width: int, bits: int, group_size: int, store: torch.dtype, zeros: str = "float") -> int:
    """Bytes of ``bits``-bit codes packed end to end, plus a scale and a zero per ``group_size`` columns of each row
    (a float zero in ``store``, or a ``bits``-bit integer zero code, packed)."""
    runs = rows * (width // group_size)
    if zeros == "int":
        return packed_bytes(rows * width, bits) + runs * item_size(store) + packed_bytes(runs, bits)
    return packed_bytes(rows * width, bits) + 2 * runs * item_size(store)


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


def snapped(low: torch.Tensor, high: torch.Tensor, levels, store: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored scale over ``low .. high`` and a zero on its own grid, ``-scale * zero_code`` (float32, exact).

    A flat run keeps its one value: its scale is that value's size over ``levels`` steps.
    """
    spread = torch.where(high > low, high - low, low.abs())
    scale = (spread / torch.as_tensor(levels, dtype=torch.float32)).to(store)
    return scale, -scale.float() * zero_codes(scale, low, levels).float()


def zero_codes(scale: torch.Tensor, zero: torch.Tensor, levels) -> torch.Tensor:
    """The integer codes ``0 .. levels`` nearest ``-zero / scale`` (int32): where a run's minimum ``zero`` lies on
    its grid, and so the stored code of a zero made by :func:`snapped`."""
    s = scale.float()
    code = torch.where(s > 0, torch.round(-zero.float() / torch.where(s > 0, s, 1)), 0)
    return torch.minimum(code.clamp(min=0), torch.as_tensor(levels, dtype=code.dtype).expand_as(code)).to(torch.int32)


def searched(w: torch.Tensor, levels, store: torch.dtype, zeros: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """The stored scale and zero of each run of ``w``'s last dimension whose own rounding error is least,
    among its min-max range scaled towards zero by each of :data:`SHRINK` (the first is min-max itself)."""
    w = w.float()
    steps = torch.as_tensor(levels, dtype=torch.float32)
    per_run = steps.unsqueeze(-1) if steps.dim() else steps
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    best = None
    for fraction in SHRINK.tolist():
        if zeros == "int":
            scale, zero = snapped(low * fraction, high * fraction, levels, store)
        else:
            scale, zero = ((high - low) * fraction / steps).to(store), (low * fraction).to(store)
        fit = zero.float().unsqueeze(-1) + scale.float().unsqueeze(-1) * rounded(
            w, scale.unsqueeze(-1), zero.unsqueeze(-1), per_run)
        error = (w - fit).pow(2).sum(dim=-1)
        if best is None:
            best = (scale, zero, error)
            continue
        better = error < best[2]
        best = tuple(torch.where(better, new, old) for new, old in zip((scale, zero, error), best))
    return best[0], best[1]


def fitted(w: torch.Tensor, levels, store: torch.dtype, kind: str = "minmax",
           zeros: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """The stored scale and zero of each run by the named grid (see :data:`GRIDS`); an ``int`` zero lies on the grid."""
    if kind == "mse":
        return searched(w, levels, store, zeros)
    if zeros == "int":
        return snapped(w.float().amin(dim=-1), w.float().amax(dim=-1), levels, store)
    return grid(w, levels, store)


def check_grid(kind: str, method: str, zeros: str = "float") -> str:
    """``kind`` if it names a grid and ``zeros`` a zero storage; otherwise one clear error naming the valid ones."""
    if kind not in GRIDS:
        raise AECompressError(f"{method} grid {kind!r} is not one of: {', '.join(GRIDS)}")
    if zeros not in ZEROS:
        raise AECompressError(f"{method} zeros {zeros!r} is not one of: {', '.join(ZEROS)}")
    return kind


def stored(codes: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor, zeros: str) -> dict:
    """The stored tensors of single-width codes: packed codes, scales, and float zeros or packed zero codes."""
    if zeros == "int":
        return {"codes": packed(codes, bits), "scale": scale.contiguous(),
                "zero_codes": packed(zero_codes(scale, zero, 2**bits - 1), bits)}
    return {"codes": packed(codes, bits), "scale": scale.contiguous(), "zero": zero.contiguous()}


def zeros_of(tensors: dict, scale: torch.Tensor, start: int, count: int, bits: int) -> torch.Tensor:
    """The float zeros of ``count`` runs from run ``start``: stored, or ``-scale * zero_code`` (scale: those runs')."""
    codes = unpacked(bit_slice(tensors["zero_codes"], start * bits, count * bits), count, bits)
    return -scale.float() * codes.view(scale.shape).float()


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


METHOD = Method("quantize", decode=decode, runtime=runtime, compress=compress, tunable=True, renamed={"bits": "code_bits"})
