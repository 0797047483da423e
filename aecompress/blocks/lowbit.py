"""Few-bit factor codes: how to balance their columns, and how many bits to spend.

A factorization ``W ≈ A B`` can store ``A`` (one row of codes per weight row) as
3- to 8-bit integers with a float16 scale per row (:mod:`aecompress.core.codes`).
What that rounding costs is decided here, once, for the factorization baselines
and for the autoencoder that starts from them:

- **Column gains.** ``A = (W L) V_r`` has columns of norm ``σ_j`` (for plain and
  whitened SVD), so each row's scale is set by its leading columns while every
  column's rounding error counts the same in the error the factorization
  minimizes. Storing ``A diag(g)⁻¹`` and ``diag(g) B``, with ``g_j`` the column
  norms of ``A`` relative to the largest, raised to ``1 - α``, leaves the product
  unchanged and spreads the step size more evenly. ``α`` is picked from a short
  grid by the rounding error it leaves (``α = 1`` is the plain layout). On SmolLM2's
  stacked ``k_proj`` at full rank this cuts the whitened error of int8 codes
  about 50-fold (``α = 0.25``).
- **Bit width.** Fewer bits buy a larger rank for the same bytes. The width
  kept is the one whose truncation error plus rounding error is smallest, both
  measured in the space the factorization optimizes (whitened, Fisher-weighted
  or plain), so no evaluation text is involved.
- **Refinement columns.** A factorization's rank stops at the matrix's smaller
  side, so at low ratios its codes leave budget unused. Codes with more columns
  than that (an autoencoder's latents may be wider than the rank) spend it: each
  extra column stores the rounding residual of one leading column, ``2 * levels``
  times finer, and its decoder row is that column's row divided by the same
  factor. The residual fits the row's existing scale, so the other codes do not change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from aecompress.blocks.factorize import Factorization
from aecompress.core.codes import dequantize_rows, levels, quantize_rows

GAIN_EXPONENTS = (0.0, 0.125, 0.25, 0.5, 1.0)  # α; 1.0 is the plain layout


def gains(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-column gains ``(‖a_j‖ / max_j ‖a_j‖)^(1 - α)``; 1 for all-zero columns (and for ``α = 1``)."""
    norms = a.norm(dim=0)
    top = norms.max().clamp_min(torch.finfo(norms.dtype).tiny)
    return torch.where(norms > 0, (norms / top) ** (1 - alpha), torch.ones_like(norms))


def refine(a: torch.Tensor, b: torch.Tensor, bits: int, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``extra`` more columns holding the rounding residual of ``a``'s first columns, finer by ``2 * levels``.

    Returns codes ``(rows, rank + extra)`` and decoder rows ``(rank + extra, width)`` whose product
    equals ``a @ b``; after rounding, the residual columns cancel most of the first columns' error.
    """
    if extra <= 0:
        return a, b
    factor = 2 * levels(bits)
    codes, scale = quantize_rows(a, bits)
    bound = levels(bits) * scale.float().unsqueeze(1)  # the row's own range: the scale stays as it is
    residual = ((a - dequantize_rows(codes, scale)) * factor)[:, :extra]
    return torch.cat([a, torch.minimum(residual.abs(), bound) * residual.sign()], 1), torch.cat([b, b[:extra] / factor])


def rounding_error(
    a: torch.Tensor, gain: torch.Tensor, bits: int, row_weights: torch.Tensor | None, extra: int = 0
) -> float:
    """Squared error that storing ``a / gain`` (plus ``extra`` refinement columns) in ``bits``-bit codes leaves.

    Measured in ``a``'s units and row-weighted.
    """
    scaled = a / gain
    rank, factor = a.shape[1], 2 * levels(bits)
    stored = dequantize_rows(*quantize_rows(refine(scaled, scaled.new_zeros(rank, 1), bits, extra)[0], bits))
    kept = stored[:, :rank].clone()
    kept[:, :extra] += stored[:, rank:] / factor
    diff = (scaled - kept) * gain
    per_row = diff.double().pow(2).sum(dim=1)
    return float(per_row.sum() if row_weights is None else (per_row * row_weights.double() ** 2).sum())


def balance(
    a: torch.Tensor, b: torch.Tensor, bits: int, row_weights: torch.Tensor | None = None, balanced: bool = True,
    extra: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``A`` and ``B`` rescaled by the column gains that round best, with the product unchanged.

    Args:
        a: codes before rounding (rows x rank), float32.
        b: the right factor (rank x width), float32.
        bits: the code width.
        row_weights: weights of each row's error (Fisher-weighted SVD); None for equal weights.
        balanced: False keeps the plain layout (``α = 1``).
        extra: refinement columns to append (see :func:`refine`), at most ``rank``.

    Returns:
        ``a / g`` and ``g b`` (with their refinement columns), the chosen ``α`` and the rounding error left.
    """
    candidates = GAIN_EXPONENTS if balanced else (1.0,)
    scored = [(rounding_error(a, gains(a, alpha), bits, row_weights, extra), alpha) for alpha in candidates]
    error, alpha = min(scored)
    gain = gains(a, alpha)
    return *refine(a / gain, b * gain.unsqueeze(1), bits, extra), alpha, error


def layout_error(fact: Factorization, columns: int, bits: int, balanced: bool = True) -> float:
    """Truncation plus rounding error of ``columns`` ``bits``-bit code columns, in the factorization's own space.

    Columns beyond the factorization's full rank are refinement columns (:func:`refine`).
    """
    rank = min(columns, len(fact.s))
    a, b = fact.factors(rank, torch.float32)
    truncation = float(fact.s[rank:].double().pow(2).sum())
    return truncation + balance(a, b, bits, fact.row_scale, balanced, columns - rank)[3]


def pick_bits(options: Mapping[int, Sequence[tuple[Factorization, int]]], balanced: bool = True) -> int:
    """The bit width whose (factorization, rank) blocks leave the least total error.

    Args:
        options: for each bit width that fits the budget, the blocks with the code columns each gets.
        balanced: whether the codes will be stored with balanced column gains.
    """
    return min(options, key=lambda bits: sum(layout_error(f, r, bits, balanced) for f, r in options[bits]))
