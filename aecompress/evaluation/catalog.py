"""Which metrics exist, which way each is better, which a model can be asked for, and how it is fed.

The one table of metric names and directions: ``evaluate``, the validation callback, the
benchmark's tables and the paired z all read it.
"""

from __future__ import annotations

import torch
from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.formats.sources import max_positions, model_kind

METRICS = ("kl_to_original", "kl_to_original_p99", "top1_agreement", "perplexity", "mlm_perplexity",
           "embedding_fidelity", "lee_pearson", "lee_spearman", "polarity_accuracy")
"""Every metric name; these are also the keys of ``evaluate --json``."""
HIGHER_IS_BETTER = {"kl_to_original": False, "kl_to_original_p99": False, "top1_agreement": True,
                    "perplexity": False, "mlm_perplexity": False, "embedding_fidelity": True,
                    "lee_pearson": True, "lee_spearman": True, "polarity_accuracy": True}
FIDELITY_METRICS = ("kl_to_original", "kl_to_original_p99", "top1_agreement")
"""Causal-LM metrics against the original (see :mod:`aecompress.evaluation.fidelity`): they rank; perplexity is beside them."""
CAUSAL_METRICS = (*FIDELITY_METRICS, "perplexity")
"""Measured per token of a causal LM, in one pass."""
TOKEN_ITEMS = ("kl_to_original", "top1_agreement", "perplexity")
"""Metrics whose per-token scores can be paired between two models (their items are correlated tokens)."""
FIDELITY_LENGTH = 128
"""Tokens per sentence (truncated) for embedding fidelity."""
SENTENCE_METRICS = ("embedding_fidelity", "lee_pearson", "lee_spearman", "polarity_accuracy")
OWN_TOKENS = ("lee_pearson", "lee_spearman", "polarity_accuracy")
"""Metrics each model measures on its own tokens, with no original and no per-item pairing: two models of
different tokenizers compare on these alone (``evaluate --against``)."""


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def window_for(model: nn.Module, window: int | None, default: int) -> int:
    limit = max_positions(model)
    if window is None:
        return min(default, limit) if limit else default
    if limit and window > limit:
        raise AECompressError(f"window {window} is longer than {type(model).__name__}'s {limit} positions; use 2..{limit}")
    return window


def cannot(metric: str, model: nn.Module) -> str:
    need = {"mlm_perplexity": "a masked-LM head (...ForMaskedLM)"}.get(metric, "a causal LM head (...ForCausalLM)")
    return (f"{metric} needs {need}; {type(model).__name__} has none. "
            f"Metrics for it: {', '.join(applicable_metrics(model))}")


def applicable_metrics(model: nn.Module) -> list[str]:
    """The metrics a model can be asked for."""
    kind = model_kind(model)
    head = {"causal_lm": list(CAUSAL_METRICS), "masked_lm": ["mlm_perplexity"], "encoder": []}[kind]
    return head + list(SENTENCE_METRICS)


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of this metric is better (unknown names: higher is better)."""
    return not HIGHER_IS_BETTER.get(metric, True)
