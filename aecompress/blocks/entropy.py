"""Integer codes written as the bitstream of a real entropy coder (constriction's ANS), and read back.

A learned codec's codes are counted as the words this coder writes, never as an entropy estimate:
the stored form holds those words, so the one accountant counts exactly what a file keeps. The
model is a categorical table of symbol counts that the form stores too; encoder and decoder build
the same fixed-point model from the same counts, so decoding is exact.
"""

from __future__ import annotations

import constriction
import numpy as np
import torch

WORD_BYTES = 4
"""constriction writes 32-bit words."""


def _model(counts: torch.Tensor):
    """The coder's model of a symbol table: probabilities proportional to ``counts`` (every symbol codable)."""
    return constriction.stream.model.Categorical(counts.double().numpy(), perfect=False)


def encoded(symbols: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``symbols`` (integers in ``0..len(counts)-1``) as the coder's words, held in an int32 tensor."""
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols.reshape(-1).to(torch.int32).numpy(), _model(counts))
    return torch.from_numpy(coder.get_compressed().view(np.int32).copy())


def decoded(words: torch.Tensor, counts: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` symbols ``words`` hold, as int64 (the inverse of :func:`encoded`)."""
    coder = constriction.stream.stack.AnsCoder(words.contiguous().numpy().view(np.uint32).copy())
    return torch.from_numpy(coder.decode(_model(counts), count).astype(np.int64))


def table(symbols: torch.Tensor, size: int) -> torch.Tensor:
    """The counts of each symbol in ``0..size-1``: the categorical model the stored form keeps (int32)."""
    return torch.bincount(symbols.reshape(-1), minlength=size).to(torch.int32)


def estimated_bits(symbols: torch.Tensor) -> float:
    """The empirical entropy of ``symbols`` in bits, summed: a guide for choosing a step, never a stored size."""
    counts = torch.unique(symbols, return_counts=True)[1].double()
    p = counts / counts.sum()
    return float(-(counts * p.log2()).sum())
