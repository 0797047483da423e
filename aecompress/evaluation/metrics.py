"""Measuring a model: which metrics fit it, and the one entry point every caller uses.

Every metric takes a loaded transformers model, so originals, decoded exports and compact
exports are measured by the same code; the validation callback, ``aecompress evaluate`` and
the benchmark all call :func:`evaluate_model`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.data.specs import parse_spec
from aecompress.data.tokens import token_ids
from aecompress.evaluation.catalog import (
    CAUSAL_METRICS,
    FIDELITY_METRICS,
    METRICS,
    applicable_metrics,
    cannot,
    window_for,
)
from aecompress.evaluation.causal import causal_token_scores, teacher_targets
from aecompress.evaluation.fidelity import TeacherTargets
from aecompress.evaluation.masked import mlm_perplexity
from aecompress.evaluation.sentences import fidelity_cosines, fidelity_sentences, lee_correlation, polarity_accuracy
from aecompress.formats.sources import model_kind

log = logging.getLogger(__name__)

MIN_TOKENS = 64
"""Fewer scored tokens than this give a perplexity too noisy to read; evaluation says so."""
MIN_SENTENCES = 8
"""Likewise for sentences in embedding fidelity."""


def default_metrics(model: nn.Module, data: str, has_reference: bool = False) -> list[str]:
    """The metrics that fit the model's head and the data.

    Causal LMs get the fidelity metrics when there is an original to compare with (they rank)
    and ``perplexity`` beside them; masked LMs ``mlm_perplexity``. Encoders without an
    LM head get the Lee correlations for ``lee``, polarity for ``polarity``, and otherwise
    embedding fidelity (when there is an original to compare with) plus both.
    """
    kind = model_kind(model)
    if kind == "causal_lm":
        return [*FIDELITY_METRICS, "perplexity"] if has_reference else ["perplexity"]
    if kind == "masked_lm":
        return ["mlm_perplexity"]
    base = parse_spec(data).base
    if base == "lee":
        return ["lee_pearson", "lee_spearman"]
    if base == "polarity":
        return ["polarity_accuracy"]
    return (["embedding_fidelity"] if has_reference else []) + ["lee_pearson", "lee_spearman", "polarity_accuracy"]


def check_metrics(metrics: Iterable[str], model: nn.Module, has_reference: bool) -> list[str]:
    """Refuse unknown metrics and metrics this model cannot do, in one line each."""
    metrics = list(dict.fromkeys(metrics))
    for metric in metrics:
        if metric not in METRICS:
            raise AECompressError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
        if metric in (*CAUSAL_METRICS, "mlm_perplexity") and metric not in applicable_metrics(model):
            raise AECompressError(cannot(metric, model))
        if metric in ("embedding_fidelity", *FIDELITY_METRICS) and not has_reference:
            raise AECompressError(
                f"{metric} compares a compressed model with its original; this model has none "
                "(evaluate an aecompress export, whose aecompress.json names its source_model, or give --reference)"
            )
    return metrics


def evaluate_model(
    model: nn.Module,
    tokenizer,
    data: str,
    metrics: list[str] | None = None,
    reference: nn.Module | torch.Tensor | TeacherTargets | None = None,
    max_tokens: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    ids: torch.Tensor | None = None,
    items: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Measure a model: the one entry point for the callback, the command and the benchmark.

    Args:
        model: a transformers model in eval mode (any device).
        tokenizer: its tokenizer.
        data: a data spec (see :mod:`aecompress.data.specs`), e.g. ``wiki:validation``.
        metrics: names from ``METRICS``; ``None`` picks those that fit (``default_metrics``).
        reference: the original model; or, computed from it once, its embeddings of
            ``fidelity_sentences(data)`` (encoders) or its :class:`TeacherTargets` on ``data``
            (causal LMs: the same window, stride and ``max_tokens``).
        max_tokens: use only the first this many tokens of ``data``.
        window: tokens per sequence (default 512 for perplexity, 128 for masked LM,
            capped at the model's positions).
        stride: tokens between windows for ``perplexity`` (default: ``window``).
        batch_size: sequences per forward pass.
        seed: masking seed for ``mlm_perplexity``.
        ids: the token stream of ``data`` if the caller already holds it.
        items: if given, filled with the per-item scores behind ``perplexity`` (each token's
            NLL), ``kl_to_original`` (each token's KL), ``top1_agreement`` (1 or 0 per token) and
            ``embedding_fidelity`` (each sentence's cosine), so two models measured on the same
            items can be compared pairwise (:mod:`aecompress.evaluation.paired`).

    Returns:
        Metric name to value, in the order asked.
    """
    chosen = check_metrics(metrics if metrics is not None else default_metrics(model, data, reference is not None),
                           model, reference is not None)
    needs_stream = any(m in (*CAUSAL_METRICS, "mlm_perplexity") for m in chosen)
    if needs_stream and ids is None:
        ids = token_ids(data, tokenizer)
    if ids is not None and max_tokens:
        ids = ids[:max_tokens]
    results: dict[str, float] = {}
    if any(m in CAUSAL_METRICS for m in chosen):
        results.update(_causal(model, ids, chosen, reference, window, stride, batch_size, items))
    for metric in chosen:
        if metric == "mlm_perplexity":
            results[metric] = mlm_perplexity(model, tokenizer, ids, seed, window, batch_size)
        elif metric == "embedding_fidelity":
            cosines = fidelity_cosines(model, reference, tokenizer, fidelity_sentences(data, tokenizer, max_tokens))
            results[metric] = float(cosines.mean())
            _keep(items, metric, cosines)
            _few(metric, len(cosines), "sentences", MIN_SENTENCES)
        elif metric in ("lee_pearson", "lee_spearman"):
            if metric not in results:
                results["lee_pearson"], results["lee_spearman"] = lee_correlation(model, tokenizer)
        elif metric == "polarity_accuracy":
            results[metric] = polarity_accuracy(model, tokenizer)
    return {m: results[m] for m in chosen}


def targets_for(reference: nn.Module, ids: torch.Tensor, window: int | None = None, stride: int | None = None,
                batch_size: int = 4) -> TeacherTargets:
    """The original's targets on a token stream, with the window ``evaluate_model`` will use."""
    w = window_for(reference, window, 512)
    return teacher_targets(reference, ids, w, stride or w, batch_size)


def _causal(model: nn.Module, ids: torch.Tensor, chosen: list[str], reference, window: int | None, stride: int | None,
            batch_size: int, items: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """Perplexity and the fidelity metrics, all from one pass over the windows."""
    if model_kind(model) != "causal_lm":
        raise AECompressError(cannot("perplexity", model))
    w = window_for(model, window, 512)
    targets = None
    if any(m in FIDELITY_METRICS for m in chosen):
        targets = reference if isinstance(reference, TeacherTargets) else targets_for(reference, ids, w, stride, batch_size)
    scores = causal_token_scores(model, ids, w, stride or w, batch_size, targets)
    _few("perplexity", len(scores["nll"]), "tokens", MIN_TOKENS)
    out = {}
    if targets is not None:  # kept first: per-item choices (the guard, refine_codes: auto) rank by the first
        out.update(kl_to_original=float(scores["kl"].mean()), kl_to_original_p99=float(scores["kl"].quantile(0.99)),
                   top1_agreement=float(scores["agree"].mean()))
        _keep(items, "kl_to_original", scores["kl"])
        _keep(items, "top1_agreement", scores["agree"])
    out["perplexity"] = math.exp(float(scores["nll"].mean()))
    _keep(items, "perplexity", scores["nll"])
    return out


def _few(metric: str, count: int, what: str, least: int) -> None:
    if count < least:
        log.warning("%s is measured on only %d %s; a value from so few is noise (give at least %d)",
                    metric, count, what, least)


def _keep(items: dict[str, torch.Tensor] | None, metric: str, scores: torch.Tensor) -> None:
    if items is not None:
        items[metric] = scores
