"""Masked-LM quality: perplexity of whole-word-masked tokens, masks drawn from a fixed seed.

Every model compared sees the same masks: they depend only on the ids, the word
boundaries and the seed, never on a model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.data.tokens import token_ids, windows
from aecompress.evaluation.catalog import cannot, device_of, window_for
from aecompress.formats.sources import model_kind


def word_starts(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """Which tokens begin a word (WordPiece ``##``, or ``Ġ``/``▁`` prefixes); special tokens are never words."""
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    if any(t.startswith("##") for t in tokens):
        starts = [not t.startswith("##") for t in tokens]
    elif any(t.startswith(("Ġ", "▁")) for t in tokens):
        starts = [t.startswith(("Ġ", "▁")) for t in tokens]
    else:
        starts = [True] * len(tokens)
    return torch.tensor(starts)


def whole_word_mask(
    ids: torch.Tensor, starts: torch.Tensor, special: torch.Tensor, seed: int = 0, probability: float = 0.15
) -> torch.Tensor:
    """A boolean mask over ``[n, window]`` ids that covers whole words, drawn from ``seed``.

    In each window, ``max(1, round(probability * words))`` words are chosen uniformly;
    every token of a chosen word is masked. The mask depends only on the ids, the word
    boundaries and the seed, never on a model, so every model compared gets the same masks.
    """
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row in range(ids.shape[0]):
        is_start = starts[row] & ~special[row]
        word = torch.cumsum(is_start.long(), 0) - 1  # word index of each token
        word[special[row]] = -1
        n_words = int(is_start.sum())
        if n_words == 0:
            continue
        chosen = torch.randperm(n_words, generator=generator)[: max(1, round(probability * n_words))]
        mask[row] = torch.isin(word, chosen) & (word >= 0)
    return mask


def mlm_batches(tokenizer, ids: torch.Tensor, window: int, seed: int, probability: float):
    """Windows wrapped in [CLS] ... [SEP], their masked inputs and labels (-100 where unmasked)."""
    if tokenizer.mask_token_id is None:
        raise AECompressError(f"tokenizer {type(tokenizer).__name__} has no mask token; mlm_perplexity needs one")
    cls = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
    sep = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
    inner = window - len(cls) - len(sep)
    chunks = windows(ids, inner, inner)
    n = chunks.shape[0]
    full = torch.cat([torch.tensor(cls, dtype=torch.long).expand(n, len(cls)), chunks,
                      torch.tensor(sep, dtype=torch.long).expand(n, len(sep))], dim=1)
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    special = torch.isin(full, special_ids)
    starts = word_starts(tokenizer, full.reshape(-1)).reshape(full.shape)
    mask = whole_word_mask(full, starts, special, seed, probability)
    inputs = full.masked_fill(mask, tokenizer.mask_token_id)
    labels = full.masked_fill(~mask, -100)
    return inputs, labels


@torch.no_grad()
def mlm_perplexity(
    model: nn.Module,
    tokenizer,
    spec_or_ids: str | torch.Tensor,
    seed: int = 0,
    window: int | None = None,
    batch_size: int = 8,
    probability: float = 0.15,
    max_tokens: int | None = None,
) -> float:
    """Masked-LM perplexity: ``exp(mean NLL)`` of whole-word-masked tokens.

    Args:
        model: a model with a masked-LM head (``...ForMaskedLM``).
        tokenizer: its tokenizer (needs a mask token).
        spec_or_ids: a data spec or a 1-D token stream.
        seed: the masking seed; keep it fixed across the models you compare.
        window: tokens per sequence including [CLS] and [SEP] (default: min(128, model limit)).
        batch_size: sequences per forward pass.
        probability: share of words masked in each sequence.
        max_tokens: use only the first this many tokens of the stream.
    """
    if model_kind(model) != "masked_lm":
        raise AECompressError(cannot("mlm_perplexity", model))
    ids = token_ids(spec_or_ids, tokenizer) if isinstance(spec_or_ids, str) else spec_or_ids
    ids = ids[:max_tokens] if max_tokens else ids
    inputs, labels = mlm_batches(tokenizer, ids, window_for(model, window, 128), seed, probability)
    device = device_of(model)
    total, count = 0.0, 0
    for begin in range(0, len(inputs), batch_size):
        batch, target = inputs[begin : begin + batch_size].to(device), labels[begin : begin + batch_size].to(device)
        logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += int((target != -100).sum())
    return math.exp(total / count)
