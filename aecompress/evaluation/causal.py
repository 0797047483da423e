"""Causal-LM quality: next-token NLL per token over fixed windows, and perplexity.

The sliding-window protocol: the first window scores all its predictions, every later one
only its last ``stride`` tokens, each with up to ``window - 1`` tokens of context. Per-token
values let two models be compared on the same tokens (see :mod:`aecompress.evaluation.paired`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.data.tokens import windows
from aecompress.evaluation.catalog import cannot, device_of
from aecompress.formats.sources import model_kind


def batch_token_nll(model: nn.Module, batch: torch.Tensor, first: bool, stride: int) -> torch.Tensor:
    """NLL of each scored token of one batch of windows (float64, CPU), in stream order.

    ``first`` says the batch holds the stream's first window.
    """
    window = batch.shape[1]
    labels = torch.full_like(batch, -100)
    labels[:, :-1] = batch[:, 1:]  # position t predicts token t + 1; no copy of the logits needed
    if stride < window:  # windows after the first score only their last ``stride`` tokens
        labels[1 if first else 0 :, : window - 1 - stride] = -100
    logits = model(input_ids=batch, use_cache=False).logits
    flat = labels.reshape(-1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, reduction="none")
    return nll[flat != -100].double().cpu()


@torch.no_grad()
def causal_token_nll(
    model: nn.Module, ids: torch.Tensor, window: int = 512, stride: int = 512, batch_size: int = 4
) -> torch.Tensor:
    """Next-token NLL of every scored token, in stream order (float64, CPU).

    The first window scores all its ``window - 1`` predictions; every later window
    (starting ``stride`` tokens after the previous one) scores only its last ``stride``
    tokens, each with up to ``window - 1`` tokens of context. Per-token values let two
    models be compared on the same tokens (see :mod:`aecompress.evaluation.paired`).
    """
    chunks = windows(ids, window, stride)
    device = device_of(model)
    parts = [
        batch_token_nll(model, chunks[begin : begin + batch_size].to(device), begin == 0, stride)
        for begin in range(0, len(chunks), batch_size)
    ]
    return torch.cat(parts)


def causal_nll(
    model: nn.Module, ids: torch.Tensor, window: int = 512, stride: int = 512, batch_size: int = 4
) -> tuple[float, int]:
    """Summed next-token NLL and the number of tokens it covers (see :func:`causal_token_nll`)."""
    nll = causal_token_nll(model, ids, window, stride, batch_size)
    return float(nll.sum()), len(nll)


def causal_perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512, stride: int = 512, batch_size: int = 4) -> float:
    """Causal-LM perplexity of a token stream, ``exp(mean NLL)`` over the scored tokens.

    Args:
        model: a model with a causal LM head (``...ForCausalLM``).
        ids: the 1-D token stream (see :func:`aecompress.data.tokens.token_ids`).
        window: tokens per forward pass.
        stride: tokens between window starts; ``stride == window`` gives disjoint windows.
        batch_size: windows per forward pass.
    """
    return math.exp(float(checked_token_nll(model, ids, window, stride, batch_size).mean()))


def checked_token_nll(model: nn.Module, ids: torch.Tensor, window: int, stride: int, batch_size: int) -> torch.Tensor:
    if model_kind(model) != "causal_lm":
        raise AECompressError(cannot("perplexity", model))
    return causal_token_nll(model, ids, window, stride, batch_size)
