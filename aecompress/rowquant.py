"""Int8 rows with one float16 scale each: the low-bit storage for codes.

Latent codes (an autoencoder's latents, a factorization's ``A``) are where
most stored numbers sit, and they tolerate 8 bits well: each row is scaled by
its own absolute maximum, so the error is at most half a step of that row's
scale. About half the bytes of float16 buys a larger rank at the same budget.
Autoencoders and factorizations use this same code, so they are counted and
decoded alike.

The scale is rounded *up* to float16, so no code is ever clamped. Rows whose
maximum is below about 7.6e-6 get the smallest float16 scale (an absolute error
of at most 3e-8); rows above about 8.3e6 cannot be scaled in float16 and are refused.
"""

from __future__ import annotations

import torch

from aecompress.errors import AECompressError

SCALE_DTYPE = torch.float16
LEVELS = 127  # symmetric: codes in -127..127
SCALES_SUFFIX = "_scales"


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes per row and their float16 scales (an all-zero row gets scale 0).

    The codes are computed against the stored float16 scale, so decoding
    ``codes * scale`` reproduces exactly what :func:`fake_int8` returns.

    Raises:
        AECompressError: if a row is too large for a float16 scale.
    """
    exact = values.detach().float().abs().amax(dim=1) / LEVELS
    scale = exact.to(SCALE_DTYPE)
    low = scale.float() < exact
    scale[low] = torch.nextafter(scale[low], torch.full_like(scale[low], float("inf")))
    if not torch.isfinite(scale).all():
        raise AECompressError(
            f"a row of magnitude {float(exact.max()) * LEVELS:.3g} is too large for int8 codes with a float16 "
            f"scale (at most {torch.finfo(SCALE_DTYPE).max * LEVELS:.3g}); store these codes in a float dtype"
        )
    safe = scale.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = torch.round(values.detach().float() / safe).clamp(-LEVELS, LEVELS).to(torch.int8)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 rows from int8 codes and per-row scales."""
    return codes.float() * scale.float().unsqueeze(1)


def fake_int8(values: torch.Tensor) -> torch.Tensor:
    """The int8 round trip in the forward pass, identity in the backward (straight-through).

    Training then optimizes the values the stored form will actually hold.
    """
    rounded = dequantize_rows(*quantize_rows(values)).to(values.dtype)
    return values + (rounded - values).detach()


def stored_values(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """``tensors[key]`` as float32, dequantized when it is stored as int8 with ``key + "_scales"``.

    Raises:
        AECompressError: if int8 codes come without their scales, or the scales do not
            give one value per row: decoding raw codes would silently produce garbage.
    """
    values, scales = tensors[key], tensors.get(key + SCALES_SUFFIX)
    if scales is None:
        if values.dtype == torch.int8:
            raise AECompressError(f"{key!r} holds int8 codes but {key + SCALES_SUFFIX!r} is missing")
        return values.float()
    if values.dtype != torch.int8 or values.dim() != 2 or tuple(scales.shape) != (values.shape[0],):
        raise AECompressError(
            f"{key!r} ({values.dtype}, shape {tuple(values.shape)}) and {key + SCALES_SUFFIX!r} "
            f"(shape {tuple(scales.shape)}) do not match: expected int8 rows and one scale per row"
        )
    return dequantize_rows(values, scales)
