"""Is a trained step's validation gain over the start bigger than the slice's noise?

Start selection keeps the factorization a run started from unless a trained step measures
better on validation. On a small slice a lower value may be chance. Both models are measured
on the *same* items, so the noise that matters is that of the paired difference, which is far
smaller than the noise of either value. Neighbouring tokens are correlated, so its standard
error comes from the means of blocks of consecutive items (the batch-means estimator), not
from single items. (Measured on SmolLM2, requiring 2 standard errors made selection worse on
test where it changed the choice; it is an option, not the default.)
"""

from __future__ import annotations

import math

import torch

from aecompress.core.errors import AECompressError
from aecompress.evaluation.catalog import HIGHER_IS_BETTER, TOKEN_ITEMS

BLOCK_TOKENS = 64
"""Items per block for per-token losses: long enough to hold most of a token's correlation with its
neighbours, short enough that a 4,096-token slice still gives 64 blocks to estimate the spread from."""


def gain_z(candidate: torch.Tensor, start: torch.Tensor, higher_is_better: bool, block: int = 1) -> float:
    """How many standard errors the candidate's mean per-item score beats the start's by.

    Args:
        candidate: per-item scores of the trained step (a token's NLL, a sentence's cosine).
        start: the same items' scores at the start, in the same order.
        higher_is_better: whether a larger score is better (cosine) or worse (NLL).
        block: about this many consecutive items are averaged into one block to estimate the
            spread (the items split into ``len // block`` near-equal blocks); the mean gain is
            over all items, so the sign of the result is the sign of the difference of the means.

    Returns:
        The mean gain over its standard error: positive when the candidate is better,
        ``inf``/``-inf`` when every block gains (loses) exactly the same, 0 when nothing changed.
    """
    if candidate.shape != start.shape or candidate.ndim != 1:
        raise AECompressError(
            f"paired scores must be two 1-D tensors of the same length, got {tuple(candidate.shape)} and {tuple(start.shape)}"
        )
    gain = (candidate.double() - start.double()) * (1.0 if higher_is_better else -1.0)
    count = len(gain) // block
    if count < 2:
        raise AECompressError(f"need at least 2 blocks of {block} items to estimate a standard error, got {len(gain)} items")
    blocks = torch.stack([part.mean() for part in torch.tensor_split(gain, count)])
    mean, spread = float(gain.mean()), float(blocks.std(unbiased=True))
    if spread == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / (spread / math.sqrt(count))


def paired_z(metric: str, scores: torch.Tensor, other: torch.Tensor) -> float:
    """How many standard errors ``scores`` beat ``other`` by, on the same items of ``metric``.

    The items are those ``evaluate_model(items=...)`` fills: neighbouring tokens are correlated,
    so their spread comes from blocks of ``BLOCK_TOKENS``; sentences stand alone.
    """
    block = BLOCK_TOKENS if metric in TOKEN_ITEMS else 1
    return gain_z(scores, other, HIGHER_IS_BETTER[metric], block)
