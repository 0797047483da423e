"""Sentence-embedding quality: fidelity to the original, the Lee ratings, and a polarity probe.

- ``embedding_fidelity``: mean cosine between a model's mean-pooled sentence embeddings
  and those of its original;
- ``lee_pearson`` / ``lee_spearman``: agreement of embedding cosines with the human
  similarity ratings of the 50 Lee documents;
- ``polarity_accuracy``: accuracy of a logistic-regression probe on the 200 Pang-Lee
  sentences, 10 fixed folds.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from aecompress.core.errors import AECompressError
from aecompress.data import corpora
from aecompress.data.specs import parse_spec
from aecompress.evaluation.catalog import FIDELITY_LENGTH, device_of
from aecompress.formats.sources import max_positions


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], max_length: int = 256, batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled last hidden states (padding excluded), one row per sentence, float32 on CPU."""
    device = device_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    limit = max_positions(model)
    max_length = min(max_length, limit) if limit else max_length
    out = []
    for begin in range(0, len(sentences), batch_size):
        rows = tokenizer(sentences[begin : begin + batch_size], truncation=True, max_length=max_length)["input_ids"]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        output = model(input_ids=input_ids, attention_mask=attention, output_hidden_states=True)
        hidden = output.hidden_states[-1].float()
        weights = attention.unsqueeze(-1).float()
        out.append(((hidden * weights).sum(1) / weights.sum(1).clamp_min(1)).cpu())
    return torch.cat(out)


def fidelity_sentences(data: str, tokenizer, max_tokens: int | None = None, limit: int = 256) -> list[str]:
    """The paragraphs of a data spec used for embedding fidelity: the first ``limit``, within ``max_tokens``.

    A token slice (``wiki:test[:4096]``) keeps the paragraphs whose tokens lie inside it.
    """
    parsed = parse_spec(data)
    paragraphs = [p for doc in corpora.parsed_documents(parsed) for p in doc.split("\n")]

    def count(paragraph: str) -> int:
        return len(tokenizer(paragraph, add_special_tokens=False, verbose=False)["input_ids"])

    if parsed.sliced:
        lengths = [count(p) for p in paragraphs]
        first, last, _ = slice(parsed.start, parsed.stop).indices(sum(lengths))
        ends = list(itertools.accumulate(lengths))
        paragraphs = [p for p, n, end in zip(paragraphs, lengths, ends) if end - n >= first and end <= last]
    sentences, used = [], 0
    for paragraph in paragraphs:
        if len(sentences) >= limit or (max_tokens and used >= max_tokens):
            break
        sentences.append(paragraph)
        used += min(count(paragraph), FIDELITY_LENGTH)
    if not sentences:
        raise AECompressError(f"data {data!r} leaves no paragraph for embedding fidelity; give more text or a wider slice")
    return sentences


def fidelity_reference(reference: nn.Module, tokenizer, data: str, max_tokens: int | None = None) -> torch.Tensor:
    """The original's embeddings of ``data``'s fidelity sentences, computed once and reused every epoch."""
    return embed(reference, tokenizer, fidelity_sentences(data, tokenizer, max_tokens), max_length=FIDELITY_LENGTH)


def embedding_fidelity(
    model: nn.Module, reference: nn.Module | torch.Tensor, tokenizer, sentences: list[str]
) -> float:
    """Mean cosine between the model's and the original's sentence embeddings.

    Args:
        model: the compressed model.
        reference: the original model, or its embeddings of ``sentences`` computed once.
        tokenizer: the shared tokenizer.
        sentences: the texts to embed.
    """
    return float(fidelity_cosines(model, reference, tokenizer, sentences).mean())


def fidelity_cosines(
    model: nn.Module, reference: nn.Module | torch.Tensor, tokenizer, sentences: list[str]
) -> torch.Tensor:
    """Each sentence's cosine between the model's and the original's embedding (float64), in order."""
    ours = embed(model, tokenizer, sentences, max_length=FIDELITY_LENGTH)
    theirs = reference if isinstance(reference, torch.Tensor) else embed(reference, tokenizer, sentences, FIDELITY_LENGTH)
    if theirs.shape != ours.shape:
        raise AECompressError(f"reference embeddings have shape {tuple(theirs.shape)}, expected {tuple(ours.shape)}")
    return F.cosine_similarity(ours.double(), theirs.double(), dim=1)


def lee_correlation(model: nn.Module, tokenizer) -> tuple[float, float]:
    """Pearson and Spearman correlation of embedding cosines with the Lee human ratings (1,225 pairs)."""
    vectors = F.normalize(embed(model, tokenizer, list(corpora.lee_documents()), max_length=512).double(), dim=1)
    n = vectors.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    cosines = (vectors[i] * vectors[j]).sum(1)
    ratings = corpora.lee_ratings()
    return float(pearson_corrcoef(cosines, ratings)), float(spearman_corrcoef(cosines, ratings))


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, folds: int = 10, steps: int = 100) -> float:
    """Cross-validated accuracy of an L2-regularized logistic regression (fixed interleaved folds).

    Sample ``i`` is in fold ``i % folds``. Features are standardized on each training fold;
    the regularization matches scikit-learn's default (C = 1). Deterministic: full-batch
    L-BFGS from zero weights in float64.
    """
    x, y = features.double(), labels.double()
    fold = torch.arange(len(y)) % folds
    correct = 0
    for k in range(folds):
        train, test = fold != k, fold == k
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
        xt, xv = (x[train] - mean) / std, (x[test] - mean) / std
        w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

        def closure(xt=xt, yt=y[train], w=w, optimizer=optimizer):
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(xt @ w[:-1] + w[-1], yt, reduction="sum") + 0.5 * w[:-1].pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        correct += int((((xv @ w[:-1] + w[-1]) > 0).double() == y[test]).sum())
    return correct / len(y)


def polarity_accuracy(model: nn.Module, tokenizer) -> float:
    """Pang-Lee polarity accuracy of a logistic-regression probe on the model's sentence embeddings."""
    sentences, labels = corpora.polarity_sentences()
    return probe_accuracy(embed(model, tokenizer, sentences), labels)
