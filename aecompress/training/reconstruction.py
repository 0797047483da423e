"""Reconstruction error of decoded weight rows, reducible across DDP ranks (the module's own validation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


class ReconstructionError(Metric):
    """Mean cosine distance and relative Frobenius error of decoded rows.

    Sums are kept rather than means so that batches of any size, and shards
    on different ranks, combine exactly.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("cos_sum", "err_sq", "ref_sq", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, recon: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of reconstructed rows and their originals."""
        recon, target = recon.detach().double(), target.detach().double()
        self.cos_sum += (1 - F.cosine_similarity(recon, target, dim=1, eps=1e-12)).sum()
        self.err_sq += (recon - target).pow(2).sum()
        self.ref_sq += target.pow(2).sum()
        self.count += target.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        """``cos_dist`` (mean over rows) and ``rel_fro`` (||W' - W|| / ||W||)."""
        return {
            "cos_dist": (self.cos_sum / self.count.clamp_min(1)).float(),
            "rel_fro": (self.err_sq / self.ref_sq.clamp_min(1e-30)).sqrt().float(),
        }
