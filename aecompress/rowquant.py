"""Int8 rows with one float16 scale each: the low-bit storage for codes.

Latent codes (an autoencoder's latents, a factorization's ``A``) are where
most stored numbers sit, and they tolerate 8 bits well: each row is scaled by
its own absolute maximum, so the error is at most half a step of that row's
scale. About half the bytes of float16 buys a larger rank at the same budget.
Autoencoders and factorizations use this same code, so they are counted and
decoded alike.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16
LEVELS = 127  # symmetric: codes in -127..127
SCALES_SUFFIX = "_scales"


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes per row and their float16 scales (an all-zero row gets scale 0).

    The codes are computed against the float16-rounded scale, so decoding
    ``codes * scale`` reproduces exactly what :func:`fake_int8` returns.
    """
    scale = (values.detach().abs().amax(dim=1) / LEVELS).to(SCALE_DTYPE)
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
    """``tensors[key]`` as float32, dequantized when it is stored as int8 with ``key + "_scales"``."""
    scales = tensors.get(key + SCALES_SUFFIX)
    return tensors[key].float() if scales is None else dequantize_rows(tensors[key], scales)
