"""k-bit grids for grouped codes: their cost, fitting (min-max or clipped), rounding, packing and dequantizing.

``quantize`` rounds to nearest on these grids and ``compensated`` rounds with error feedback; both,
and ``mixed_rows``, store and read codes through the functions here, so the stored layout is one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aecompress.blocks.base import item_size
from aecompress.core.bits import bit_slice, code_values, pack_bits
from aecompress.core.budget import packed_bytes
from aecompress.core.errors import AECompressError
from aecompress.core.stored import StoredForm

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
    return code_values(stream, count, bits).to(torch.int32)


BLOCK_ELEMENTS = 1 << 16
"""About how many weights a just-in-time decode forms at a time (256 KiB of float32: stays in the CPU's cache)."""


def block_rows(rows: int, width: int) -> int:
    """Rows per block of a just-in-time decode; 0 (decode all at once) where a row's codes do not start a whole
    word of eight codes (``width`` not a multiple of 8), since only there can a block be read without shifting."""
    if width % 8:
        return 0
    return min(rows, max(8, BLOCK_ELEMENTS // width // 8 * 8))


def codes_of(stream: torch.Tensor, first: int, count: int, bits: int) -> torch.Tensor:
    """Codes ``first .. first + count`` of a stream as exact float32, ``first`` a multiple of 8 (a whole word)."""
    return code_values(stream[first * bits // 8 : -(-(first + count) * bits // 8)], count, bits)


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
    """``zero + scale * code`` for (rows x width) codes, with one scale and zero per row or per group of columns.

    Where no gradient is wanted the sum is formed in place in the one float buffer of the codes:
    the same two roundings in the same order (``scale * code``, then ``+ zero``), so the same bits,
    without two more full-size temporaries on every just-in-time decode.
    """
    m, n = codes.shape
    s, z = scale.float(), zero.float()
    s, z, runs = (s.unsqueeze(1), z.unsqueeze(1), (m, n)) if s.dim() == 1 else (s.unsqueeze(2), z.unsqueeze(2),
                                                                                 (m, s.shape[1], -1))
    if torch.is_grad_enabled() and (s.requires_grad or z.requires_grad):
        return (z + s * codes.float().view(runs)).reshape(m, n)
    out = codes.float()
    out.view(runs).mul_(s).add_(z)
    return out


@dataclass(frozen=True)
class GridCodes:
    """A form's rows as integers on one code width: ``W = scale * (code - zero_code)`` per run of columns.

    This is what another container (compressed-tensors' ``pack-quantized``) can hold of a form, converted
    from its stored tensors without rounding anything again.

    Attributes:
        bits: the code width, 1..8.
        group_size: columns per run; ``None`` for one run per row.
        codes: (rows x width) int32 in ``0 .. 2^bits - 1``.
        scale: (rows x runs) in the stored dtype.
        zero_codes: (rows x runs) int32 in ``0 .. 2^bits - 1``.
    """

    bits: int
    group_size: int | None
    codes: torch.Tensor
    scale: torch.Tensor
    zero_codes: torch.Tensor


def grid_codes(form: StoredForm) -> GridCodes:
    """The integers of a single-width form; float zeros only where each is exactly ``-scale * k``, ``k`` on the grid.

    Raises:
        AECompressError: for float zeros off the grid, naming the option that stores integer zeros.
    """
    t, (m, n), bits = form.tensors, (form.group.rows, form.group.width), int(form.meta["bits"])
    scale = t["scale"] if t["scale"].dim() == 2 else t["scale"].unsqueeze(1)
    runs = scale.shape[1]
    codes = unpacked(t["codes"], m * n, bits).view(m, n)
    if "zero_codes" in t:
        zero = unpacked(t["zero_codes"], m * runs, bits).view(m, runs)
    else:
        zero = on_grid_zeros(form, scale, t["zero"].view(m, runs), bits)
    return GridCodes(bits, None if runs == 1 else n // runs, codes, scale, zero)


def on_grid_zeros(form: StoredForm, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer zero codes of float zeros that are each exactly ``-scale * k``, ``k`` a ``bits``-bit code.

    Raises:
        AECompressError: for a zero off the grid, naming the option that stores integer zeros.
    """
    found = zero_codes(scale, zero, 2**bits - 1)
    if not torch.equal(-scale.float() * found.float(), zero.float()):
        raise AECompressError(
            f"group {form.group.name!r} ({form.method}) stores float zero points that are not on its grid "
            "(zeros: float); integer-code formats hold integer zero points only: pass --options '{zeros: int}'")
    return found
