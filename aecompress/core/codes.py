"""Integer rows of 3 to 8 bits with one float16 scale each: the low-bit storage for codes.

Latent codes (an autoencoder's latents, a factorization's ``A``) are where
most stored numbers sit, and they tolerate few bits well: each row is scaled by
its own absolute maximum, so the error is at most half a step of that row's
scale. Fewer bits per code buy a larger rank at the same budget.
Autoencoders and factorizations use this same code, so they are counted and
decoded alike.

Storage: 8-bit codes are an int8 ``(rows, columns)`` tensor. Fewer bits are
packed as bit planes, a uint8 ``(rows, bits, ceil(columns / 8))`` tensor holding
each code's two's complement bits, so the tensor's shape says its bit width and
unused padding bits decode to zero. Either way the scales sit beside the codes
under ``key + "_scales"``.

The scale is rounded *up* to float16, so no code is ever clamped. Rows whose
maximum is tiny get the smallest float16 scale (an absolute error of at most half
of it); rows above about 6.5e4 times the largest code cannot be scaled in float16 and are refused.
"""

from __future__ import annotations

import math

import torch

from aecompress.core.bits import pack_bits, unpack_bits
from aecompress.core.errors import AECompressError

SCALE_DTYPE = torch.float16
BITS = (3, 4, 5, 6, 7, 8)
SCALES_SUFFIX = "_scales"


def levels(bits: int) -> int:
    """The largest code of a symmetric ``bits``-bit quantizer: codes lie in ``-levels..levels``."""
    if bits not in BITS:
        raise AECompressError(f"codes of {bits} bits are not supported; valid: {', '.join(map(str, BITS))}")
    return 2 ** (bits - 1) - 1


def code_bytes(rows: int, columns: int, bits: int) -> int:
    """Bytes that ``rows x columns`` codes of ``bits`` bits take as stored, scales included."""
    levels(bits)
    per_row = columns if bits == 8 else bits * math.ceil(columns / 8)
    return rows * (per_row + SCALE_DTYPE.itemsize)


def quantize_rows(values: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric ``bits``-bit codes per row (as int8) and their float16 scales (an all-zero row gets scale 0).

    The codes are computed against the stored float16 scale, so decoding
    ``codes * scale`` reproduces exactly what :func:`fake_quant` returns.

    Raises:
        AECompressError: if a row is too large for a float16 scale.
    """
    top = levels(bits)
    exact = values.detach().float().abs().amax(dim=1) / top
    scale = exact.to(SCALE_DTYPE)
    low = scale.float() < exact
    scale[low] = torch.nextafter(scale[low], torch.full_like(scale[low], float("inf")))
    if not torch.isfinite(scale).all():
        raise AECompressError(
            f"a row of magnitude {float(exact.max()) * top:.3g} is too large for {bits}-bit codes with a float16 "
            f"scale (at most {torch.finfo(SCALE_DTYPE).max * top:.3g}); store these codes in a float dtype"
        )
    safe = scale.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = torch.round(values.detach().float() / safe).clamp(-top, top).to(torch.int8)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 rows from integer codes and per-row scales."""
    return codes.float() * scale.float().unsqueeze(1)


def fake_quant(values: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The ``bits``-bit round trip in the forward pass, identity in the backward (straight-through).

    Training then optimizes the values the stored form will actually hold.
    """
    rounded = dequantize_rows(*quantize_rows(values, bits)).to(values.dtype)
    return values + (rounded - values).detach()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes as stored: int8 as they are for 8 bits, else uint8 bit planes ``(rows, bits, ceil(columns / 8))``.

    Each plane holds one bit of every code's two's complement, packed by :func:`aecompress.core.bits.pack_bits`;
    padding columns are zero.
    """
    if bits == 8:
        return codes.to(torch.int8).contiguous()
    levels(bits)
    rows, columns = codes.shape
    padded = torch.zeros(rows, 8 * math.ceil(columns / 8), dtype=torch.int32, device=codes.device)
    padded[:, :columns] = codes.to(torch.int32) & (2**bits - 1)
    planes = (padded.unsqueeze(1) >> torch.arange(bits, dtype=torch.int32, device=codes.device).view(1, bits, 1)) & 1
    return pack_bits(planes).view(rows, bits, -1).contiguous()


def unpack_codes(stored: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """Int8 codes ``(rows, columns)`` from :func:`pack_codes`'s output; ``columns`` trims bit-plane padding."""
    if stored.dtype == torch.int8:
        return stored
    rows, bits, width = stored.shape
    planes = unpack_bits(stored, stored.numel() * 8).view(rows, bits, 8 * width).to(torch.int32)
    unsigned = (planes << torch.arange(bits, dtype=torch.int32, device=stored.device).view(1, bits, 1)).sum(dim=1)
    signed = torch.where(unsigned >= 2 ** (bits - 1), unsigned - 2**bits, unsigned)
    return signed[:, : 8 * width if columns is None else columns].to(torch.int8)


def stored_bits(stored: torch.Tensor) -> int:
    """The bit width of stored codes (8 for int8, else the number of bit planes)."""
    return 8 if stored.dtype == torch.int8 else int(stored.shape[1])


def stored_values(tensors: dict[str, torch.Tensor], key: str, columns: int | None = None) -> torch.Tensor:
    """``tensors[key]`` as float32, dequantized when it is stored as codes with ``key + "_scales"``.

    Args:
        tensors: a stored form's tensors.
        key: the codes' (or plain values') name.
        columns: how many code columns there are (the rank or latent size); needed to
            trim the padding of bit-plane codes, and checked against it.

    Raises:
        AECompressError: if codes come without their scales, or codes and scales
            do not match: decoding raw codes would silently produce garbage.
    """
    values, scales = tensors[key], tensors.get(key + SCALES_SUFFIX)
    if scales is None:
        if values.dtype in (torch.int8, torch.uint8):
            raise AECompressError(f"{key!r} holds integer codes but {key + SCALES_SUFFIX!r} is missing")
        return values.float()
    planes = values.dtype == torch.uint8 and values.dim() == 3 and values.shape[1] in BITS[:-1]
    int8 = values.dtype == torch.int8 and values.dim() == 2
    width = 8 * values.shape[-1] if planes else (values.shape[1] if int8 else 0)
    fits = columns is None or (planes and width - 8 < columns <= width) or (int8 and columns == width)
    if not (planes or int8) or tuple(scales.shape) != (values.shape[0],) or not fits:
        raise AECompressError(
            f"{key!r} ({values.dtype}, shape {tuple(values.shape)}) and {key + SCALES_SUFFIX!r} "
            f"(shape {tuple(scales.shape)}) do not match {columns if columns is not None else 'their'} columns: "
            "expected int8 rows or uint8 bit planes of 3 to 7 bits, and one scale per row"
        )
    return dequantize_rows(unpack_codes(values, columns), scales)


def runtime_values(tensors: dict[str, torch.Tensor], key: str, columns: int) -> torch.Tensor:
    """Stored codes as a run-time form holds them: integer codes widened once to float32, float values as stored.

    Widening once at load (not per forward pass) lets the run-time form train them like any parameter.
    """
    return stored_values(tensors, key, columns) if key + SCALES_SUFFIX in tensors else tensors[key]
