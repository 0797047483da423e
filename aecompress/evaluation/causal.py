"""Causal-LM quality: next-token NLL per token over fixed windows, perplexity, and fidelity to the original.

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
from aecompress.evaluation.fidelity import TOP_K, TeacherTargets, compare
from aecompress.formats.sources import model_kind


def scored_logits(model: nn.Module, batch: torch.Tensor, first: bool, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and next tokens of each scored position of one batch of windows, in stream order.

    ``first`` says the batch holds the stream's first window.
    """
    window = batch.shape[1]
    labels = torch.full_like(batch, -100)
    labels[:, :-1] = batch[:, 1:]  # position t predicts token t + 1; no copy of the logits needed
    if stride < window:  # windows after the first score only their last ``stride`` tokens
        labels[1 if first else 0 :, : window - 1 - stride] = -100
    logits = model(input_ids=batch, use_cache=False).logits
    flat = labels.reshape(-1)
    keep = flat != -100
    return logits.reshape(-1, logits.shape[-1])[keep], flat[keep]


def batch_token_nll(model: nn.Module, batch: torch.Tensor, first: bool, stride: int) -> torch.Tensor:
    """NLL of each scored token of one batch of windows (float64, CPU), in stream order."""
    logits, labels = scored_logits(model, batch, first, stride)
    return F.cross_entropy(logits.float(), labels, reduction="none").double().cpu()


def _batches(model: nn.Module, ids: torch.Tensor, window: int, stride: int, batch_size: int):
    chunks = windows(ids, window, stride)
    device = device_of(model)
    for begin in range(0, len(chunks), batch_size):
        yield chunks[begin : begin + batch_size].to(device), begin == 0


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
    return torch.cat([batch_token_nll(model, batch, first, stride)
                      for batch, first in _batches(model, ids, window, stride, batch_size)])


@torch.no_grad()
def teacher_targets(model: nn.Module, ids: torch.Tensor, window: int = 512, stride: int = 512, batch_size: int = 4,
                    k: int = TOP_K) -> TeacherTargets:
    """The original's next-token distributions at every scored token (see :mod:`aecompress.evaluation.fidelity`)."""
    parts = [TeacherTargets.of(scored_logits(model, batch, first, stride)[0], k)
             for batch, first in _batches(model, ids, window, stride, batch_size)]
    return TeacherTargets.joined(parts, window, stride)


@torch.no_grad()
def causal_token_scores(
    model: nn.Module, ids: torch.Tensor, window: int, stride: int, batch_size: int, targets: TeacherTargets | None
) -> dict[str, torch.Tensor]:
    """Per scored token, in one pass: ``nll``, and with the original's targets ``kl`` and ``agree`` (float64, CPU)."""
    if targets is not None and (targets.window, targets.stride) != (window, stride):
        raise AECompressError(f"the original was scored with window {targets.window} and stride {targets.stride}, "
                              f"the model with {window} and {stride}; use the same")
    out: dict[str, list[torch.Tensor]] = {"nll": [], "kl": [], "agree": []}
    done = 0
    for batch, first in _batches(model, ids, window, stride, batch_size):
        logits, labels = scored_logits(model, batch, first, stride)
        out["nll"].append(F.cross_entropy(logits.float(), labels, reduction="none").double().cpu())
        if targets is not None:
            kl, agree = compare(logits, targets.part(done, len(labels)))
            out["kl"].append(kl)
            out["agree"].append(agree)
        done += len(labels)
    if targets is not None and done != targets.tokens:
        raise AECompressError(f"the model scored {done} tokens, the original {targets.tokens}; measure the same text")
    return {name: torch.cat(parts) for name, parts in out.items() if parts}


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
