"""Rank-r factorizations W ≈ A @ B: plain, Fisher-weighted and whitened, in float64.

These are the closed-form optima that the SVD baselines store and that the
autoencoder starts from: plain truncated SVD minimizes ||W - A B||_F;
whitened SVD minimizes ||(W - A B) L||_F for a calibration covariance
C = L Lᵀ, so the error is measured on the inputs the layer really sees.
"""

from __future__ import annotations

import warnings

import torch

from aecompress.core.errors import AECompressError

SHORT_DAMP = 1e-2  # the least damping when there are fewer calibration tokens than input dimensions
MAX_DAMP = 1.0
DEFAULT_DAMP = 1e-3


class Factorization:
    """One matrix to factor: ``W L``, its whitening ``L`` and the SVD of ``diag(c) W L``.

    ``factors(r)`` gives ``A = (W L) V_r`` and ``B = V_rᵀ L⁻¹`` from the right
    singular vectors of ``diag(c) W L``: plain SVD when ``c`` and ``L`` are
    absent, Fisher-weighted with ``c``, whitened with ``L``. Both the
    baselines and the autoencoder's initialization use this one engine, so an
    autoencoder started from a factorization starts exactly at the baseline.
    """

    def __init__(self, w: torch.Tensor, row_scale: torch.Tensor | None, chol: torch.Tensor | None):
        self.rows = w.shape[0]
        self.chol = chol
        self.row_scale = row_scale
        self.wl = w if chol is None else w @ chol
        target = self.wl if row_scale is None else self.wl * row_scale.unsqueeze(1)
        _, self.s, self.vh = torch.linalg.svd(target, full_matrices=False)

    def factors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.vh[:rank]
        a = self.wl @ v.T
        b = v if self.chol is None else torch.linalg.solve_triangular(self.chol, v, upper=False, left=False)
        return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def whitening(cov: torch.Tensor, damp: float, tokens: int, name: str) -> tuple[torch.Tensor, float]:
    """The Cholesky factor of ``C + damp * mean(diag C) * I``, damping more until it exists.

    Returns:
        The lower-triangular ``L`` (float64) and the damping actually used.
    """
    n = cov.shape[0]
    cov = cov.double()
    if not torch.isfinite(cov).all():
        raise AECompressError(f"the input covariance of {name!r} holds NaN or inf; check the calibration text")
    scale = float(torch.diagonal(cov).mean())
    if scale <= 0:
        warnings.warn(f"{name!r}: the input covariance is zero; whitening with the identity", stacklevel=4)
        return torch.eye(n, dtype=torch.float64), damp
    if tokens < n and damp < SHORT_DAMP:
        warnings.warn(
            f"{name!r}: {tokens} calibration tokens cannot give a full-rank {n} x {n} covariance; "
            f"raising damping from {damp:g} to {SHORT_DAMP:g} (give more calibration text)",
            stacklevel=4,
        )
        damp = SHORT_DAMP
    eye = torch.eye(n, dtype=torch.float64)
    while True:
        chol, info = torch.linalg.cholesky_ex(cov + damp * scale * eye)
        if int(info) == 0 and torch.isfinite(chol).all():
            return chol, damp
        if damp >= MAX_DAMP:
            raise AECompressError(f"{name!r}: the input covariance stays singular even with damping {damp:g}")
        new = min(MAX_DAMP, max(damp * 10, 1e-6))
        warnings.warn(f"{name!r}: Cholesky failed at damping {damp:g}; retrying with {new:g}", stacklevel=4)
        damp = new


def rank_factors(rows: torch.Tensor, rank: int, chol: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 A (m x r) and B (r x n) of the best rank-r fit, whitened by ``chol`` if given."""
    return Factorization(rows.double(), None, None if chol is None else chol.double()).factors(rank, torch.float32)
