"""A trivial trained method, written as a new method's file would be: a linear autoencoder per group.

It stores free latents (rows x rank) and one decoder (rank x width) in float32, the rank the
largest the budget holds. It exists to show, in ``tests/test_trained_method.py``, what a new
trained method needs: this file, its row in the table, and a config naming it (``model.method``).
"""

from __future__ import annotations

import torch
from torch import nn

from aecompress.blocks.base import Method
from aecompress.core.budget import Budget, infeasible_bytes
from aecompress.core.groups import WeightGroup
from aecompress.core.stored import StoredForm


class LinearCodec(nn.Module):
    """``W ≈ latents @ decoder``; trained end to end like any codec of a trained method."""

    def __init__(self, rows: int, width: int, rank: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(rows, rank) / rank**0.5)
        self.decoder = nn.Parameter(torch.randn(rank, width) / width**0.5)

    def forward(self, rows: torch.Tensor, index: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        return self.latents[index] @ self.decoder

    def stored_tensors(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"latents": self.latents.detach().clone(), "decoder": self.decoder.detach().clone()}


def build(group: WeightGroup, target: Budget, *, rank: int | None = None) -> LinearCodec:
    """The largest rank the budget holds (or ``rank``, if it fits)."""
    allowed = target.bytes(group.rows, group.width)
    fits = allowed // (4 * (group.rows + group.width))
    if fits < 1 or (rank is not None and rank > fits):
        raise infeasible_bytes(group.name, group.rows, group.width, target, 4 * (group.rows + group.width) * (rank or 1),
                               "linear_codec")
    return LinearCodec(group.rows, group.width, rank or fits)


def decode(form: StoredForm) -> torch.Tensor:
    return form.tensors["latents"].float() @ form.tensors["decoder"].float()


METHOD = Method("linear_codec", decode=decode, build=build)
