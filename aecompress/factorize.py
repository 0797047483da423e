"""Rank-r factorizations W ≈ A @ B, plain and whitened, in float64.

These are the closed-form optima that the autoencoder starts from (and that
the SVD baselines store): plain truncated SVD minimizes ||W - A B||_F;
whitened SVD minimizes ||(W - A B) L||_F for a calibration covariance
C = L Lᵀ, so the error is measured on the inputs the layer really sees.
"""

from __future__ import annotations

import warnings

import torch


def truncated_svd(rows: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (m x r) and B (r x n) of the best rank-r approximation of ``rows``."""
    u, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()


def cholesky_factor(covariance: torch.Tensor, damp: float = 1e-2) -> torch.Tensor:
    """Lower-triangular L with L Lᵀ = C + λ·mean(diag C)·I, damping more if needed.

    A covariance from too few tokens is rank-deficient; rather than fail, the
    damping grows tenfold (with a warning) until the factorization succeeds.
    """
    c = covariance.double()
    n = c.shape[0]
    scale = torch.diagonal(c).mean().clamp_min(1e-12)
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    lam = damp
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(c + lam * scale * eye)
        if int(info) == 0:
            return factor
        warnings.warn(f"covariance is not positive definite; raising damping to {lam * 10:g}", stacklevel=2)
        lam *= 10
    raise ValueError("covariance could not be regularized to positive definite")


def whitened_svd(rows: torch.Tensor, factor: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (m x r) and B (r x n) minimizing ||(W - A B) L||_F: trunc_r(W L) L⁻¹."""
    w, lower = rows.double(), factor.double()
    u, s, vh = torch.linalg.svd(w @ lower, full_matrices=False)
    a = u[:, :rank] * s[:rank]
    # B = Vᵣᵀ L⁻¹, solved rather than inverted: Bᵀ solves Lᵀ Bᵀ = Vᵣ.
    b = torch.linalg.solve_triangular(lower.T, vh[:rank].T, upper=True).T
    return a.float(), b.float()
