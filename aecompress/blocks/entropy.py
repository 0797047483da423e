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
    counts = _counts(symbols.reshape(-1)).double()
    p = counts / counts.sum()
    return float(-(counts * p.log2()).sum())


def _counts(symbols: torch.Tensor) -> torch.Tensor:
    """How often each distinct value occurs, in increasing order of value (zero counts left out).

    Whole numbers over a span narrower than their number are counted in one pass (``bincount``) rather than
    sorted: ``entropy``'s step search counts 26 million codes 40 times on SmolLM2's MLP weights, where sorting
    took 2.2 s a time against 0.5 s. Anything else (fractions, a wider span) is sorted.
    """
    if symbols.numel() and _whole(symbols):
        low, high = symbols.min(), symbols.max()
        if float(high) - float(low) < symbols.numel():
            counts = torch.bincount((symbols - low).to(torch.int64))
            return counts[counts > 0]
    return torch.unique(symbols, return_counts=True)[1]


def _whole(symbols: torch.Tensor) -> bool:
    """Whether every value is a whole number: an integer dtype, or finite floats with no fraction."""
    if not symbols.is_floating_point():
        return True
    return bool(torch.isfinite(symbols).all()) and bool((symbols == symbols.round()).all())
