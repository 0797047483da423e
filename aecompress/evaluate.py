"""Model-level quality: the metrics, the metric chooser, and the ``aecompress evaluate`` command.

Every metric takes a loaded transformers model, so originals, decoded exports and compact
exports are measured by the same code (``load_any`` reads all three):

- ``perplexity``: causal-LM perplexity over fixed windows (the sliding-window protocol);
- ``mlm_perplexity``: masked-LM perplexity with whole-word masks drawn from a fixed seed, so
  every model compared sees the same masks;
- ``embedding_fidelity``: mean cosine between a model's mean-pooled sentence embeddings and
  those of its original;
- ``lee_pearson`` / ``lee_spearman``: agreement of embedding cosines with the human
  similarity ratings of the 50 Lee documents;
- ``polarity_accuracy``: accuracy of a logistic-regression probe on the 200 Pang-Lee
  sentences, 10 fixed folds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from aecompress import significance, text
from aecompress.errors import AECompressError

log = logging.getLogger(__name__)

METRICS = ("perplexity", "mlm_perplexity", "embedding_fidelity", "lee_pearson", "lee_spearman", "polarity_accuracy")
"""Every metric name; these are also the keys of ``evaluate --json``."""
HIGHER_IS_BETTER = {"perplexity": False, "mlm_perplexity": False, "embedding_fidelity": True,
                    "lee_pearson": True, "lee_spearman": True, "polarity_accuracy": True}
FIDELITY_LENGTH = 128
"""Tokens per sentence (truncated) for embedding fidelity."""
SENTENCE_METRICS = ("embedding_fidelity", "lee_pearson", "lee_spearman", "polarity_accuracy")


# --------------------------------------------------------------------------- models


def model_kind(model: nn.Module) -> str:
    """``causal_lm``, ``masked_lm`` or ``encoder``, from the model's class."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if name.endswith("ForMaskedLM"):
        return "masked_lm"
    return "encoder"


def max_positions(model: nn.Module) -> int | None:
    """The longest input the model's position embeddings allow, if it says."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _window(model: nn.Module, window: int | None, default: int) -> int:
    limit = max_positions(model)
    if window is None:
        return min(default, limit) if limit else default
    if limit and window > limit:
        raise AECompressError(f"window {window} is longer than {type(model).__name__}'s {limit} positions; use 2..{limit}")
    return window


# --------------------------------------------------------------------------- causal LM


def _batch_token_nll(model: nn.Module, batch: torch.Tensor, first: bool, stride: int) -> torch.Tensor:
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
    models be compared on the same tokens (see :mod:`aecompress.significance`).
    """
    chunks = text.windows(ids, window, stride)
    device = _device(model)
    parts = [
        _batch_token_nll(model, chunks[begin : begin + batch_size].to(device), begin == 0, stride)
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
        ids: the 1-D token stream (see :func:`aecompress.text.token_ids`).
        window: tokens per forward pass.
        stride: tokens between window starts; ``stride == window`` gives disjoint windows.
        batch_size: windows per forward pass.
    """
    return math.exp(float(_checked_token_nll(model, ids, window, stride, batch_size).mean()))


def _checked_token_nll(model: nn.Module, ids: torch.Tensor, window: int, stride: int, batch_size: int) -> torch.Tensor:
    if model_kind(model) != "causal_lm":
        raise AECompressError(_cannot("perplexity", model))
    return causal_token_nll(model, ids, window, stride, batch_size)


# --------------------------------------------------------------------------- masked LM


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
    chunks = text.windows(ids, inner, inner)
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
        raise AECompressError(_cannot("mlm_perplexity", model))
    ids = text.token_ids(spec_or_ids, tokenizer) if isinstance(spec_or_ids, str) else spec_or_ids
    ids = ids[:max_tokens] if max_tokens else ids
    inputs, labels = mlm_batches(tokenizer, ids, _window(model, window, 128), seed, probability)
    device = _device(model)
    total, count = 0.0, 0
    for begin in range(0, len(inputs), batch_size):
        batch, target = inputs[begin : begin + batch_size].to(device), labels[begin : begin + batch_size].to(device)
        logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += int((target != -100).sum())
    return math.exp(total / count)


# --------------------------------------------------------------------------- sentence embeddings


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], max_length: int = 256, batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled last hidden states (padding excluded), one row per sentence, float32 on CPU."""
    device = _device(model)
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
    """The paragraphs of a data spec used for embedding fidelity: the first ``limit``, within ``max_tokens``."""
    sentences, used = [], 0
    for doc in text.documents(data):
        for paragraph in doc.split("\n"):
            if len(sentences) >= limit or (max_tokens and used >= max_tokens):
                return sentences
            sentences.append(paragraph)
            used += min(len(tokenizer(paragraph, add_special_tokens=False, verbose=False)["input_ids"]), FIDELITY_LENGTH)
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
    vectors = F.normalize(embed(model, tokenizer, list(text.lee_documents()), max_length=512).double(), dim=1)
    n = vectors.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    cosines = (vectors[i] * vectors[j]).sum(1)
    ratings = text.lee_ratings()
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
    sentences, labels = text.polarity_sentences()
    return probe_accuracy(embed(model, tokenizer, sentences), labels)


# --------------------------------------------------------------------------- choosing and running metrics


def _cannot(metric: str, model: nn.Module) -> str:
    need = {"perplexity": "a causal LM head (...ForCausalLM)", "mlm_perplexity": "a masked-LM head (...ForMaskedLM)"}
    return (f"{metric} needs {need[metric]}; {type(model).__name__} has none. "
            f"Metrics for it: {', '.join(applicable_metrics(model))}")


def applicable_metrics(model: nn.Module) -> list[str]:
    """The metrics a model can be asked for."""
    kind = model_kind(model)
    head = {"causal_lm": ["perplexity"], "masked_lm": ["mlm_perplexity"], "encoder": []}[kind]
    return head + list(SENTENCE_METRICS)


def default_metrics(model: nn.Module, data: str, has_reference: bool = False) -> list[str]:
    """The metrics that fit the model's head and the data.

    Causal LMs get ``perplexity`` and masked LMs ``mlm_perplexity``. Encoders without an
    LM head get the Lee correlations for ``lee``, polarity for ``polarity``, and otherwise
    embedding fidelity (when there is an original to compare with) plus both.
    """
    kind = model_kind(model)
    if kind == "causal_lm":
        return ["perplexity"]
    if kind == "masked_lm":
        return ["mlm_perplexity"]
    base = text.parse_spec(data).base
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
        if metric in ("perplexity", "mlm_perplexity") and metric not in applicable_metrics(model):
            raise AECompressError(_cannot(metric, model))
        if metric == "embedding_fidelity" and not has_reference:
            raise AECompressError(
                "embedding_fidelity compares a compressed model with its original; this model has none "
                "(evaluate an aecompress export, whose aecompress.json names its source_model)"
            )
    return metrics


def evaluate_model(
    model: nn.Module,
    tokenizer,
    data: str,
    metrics: list[str] | None = None,
    reference: nn.Module | torch.Tensor | None = None,
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
        data: a data spec (see :mod:`aecompress.text`), e.g. ``wiki:validation``.
        metrics: names from ``METRICS``; ``None`` picks those that fit (``default_metrics``).
        reference: the original model, or its embeddings of ``fidelity_sentences(data)``,
            for ``embedding_fidelity``.
        max_tokens: use only the first this many tokens of ``data``.
        window: tokens per sequence (default 512 for perplexity, 128 for masked LM,
            capped at the model's positions).
        stride: tokens between windows for ``perplexity`` (default: ``window``).
        batch_size: sequences per forward pass.
        seed: masking seed for ``mlm_perplexity``.
        ids: the token stream of ``data`` if the caller already holds it.
        items: if given, filled with the per-item scores behind ``perplexity`` (each token's
            NLL) and ``embedding_fidelity`` (each sentence's cosine), so two models measured
            on the same items can be compared pairwise (:mod:`aecompress.significance`).

    Returns:
        Metric name to value, in the order asked.
    """
    chosen = check_metrics(metrics if metrics is not None else default_metrics(model, data, reference is not None),
                           model, reference is not None)
    needs_stream = any(m in ("perplexity", "mlm_perplexity") for m in chosen)
    if needs_stream and ids is None:
        ids = text.token_ids(data, tokenizer)
    if ids is not None and max_tokens:
        ids = ids[:max_tokens]
    results: dict[str, float] = {}
    for metric in chosen:
        if metric == "perplexity":
            w = _window(model, window, 512)
            nll = _checked_token_nll(model, ids, w, stride or w, batch_size)
            results[metric] = math.exp(float(nll.mean()))
            _keep(items, metric, nll)
        elif metric == "mlm_perplexity":
            results[metric] = mlm_perplexity(model, tokenizer, ids, seed, window, batch_size)
        elif metric == "embedding_fidelity":
            cosines = fidelity_cosines(model, reference, tokenizer, fidelity_sentences(data, tokenizer, max_tokens))
            results[metric] = float(cosines.mean())
            _keep(items, metric, cosines)
        elif metric in ("lee_pearson", "lee_spearman"):
            if metric not in results:
                results["lee_pearson"], results["lee_spearman"] = lee_correlation(model, tokenizer)
        elif metric == "polarity_accuracy":
            results[metric] = polarity_accuracy(model, tokenizer)
    return {m: results[m] for m in chosen}


def paired_z(metric: str, scores: torch.Tensor, other: torch.Tensor) -> float:
    """How many standard errors ``scores`` beat ``other`` by, on the same items of ``metric``.

    The items are those ``evaluate_model(items=...)`` fills: neighbouring tokens are correlated,
    so their spread comes from blocks of ``significance.BLOCK_TOKENS``; sentences stand alone.
    """
    block = significance.BLOCK_TOKENS if metric == "perplexity" else 1
    return significance.gain_z(scores, other, HIGHER_IS_BETTER[metric], block)


def _keep(items: dict[str, torch.Tensor] | None, metric: str, scores: torch.Tensor) -> None:
    if items is not None:
        items[metric] = scores


# --------------------------------------------------------------------------- throughput


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_throughput(
    model: nn.Module, ids: torch.Tensor, window: int = 512, stride: int | None = None, batch_size: int = 4
) -> dict[str, float]:
    """Tokens per second of the perplexity loop against a bare ``model(input_ids)`` over the same windows.

    Batch by batch, the bare forward pass and the evaluation step (forward, shifted labels,
    cross-entropy) are timed back to back, so a busy machine slows both alike. One warm-up
    batch runs first. The gap between the two rates is the evaluation code's overhead.
    """
    stride = stride or window
    chunks = text.windows(ids, window, stride)
    device = _device(model)
    model(input_ids=chunks[:batch_size].to(device), use_cache=False)
    bare = full = 0.0
    for begin in range(0, len(chunks), batch_size):
        batch = chunks[begin : begin + batch_size].to(device)
        _sync(device)
        start = time.perf_counter()
        model(input_ids=batch, use_cache=False)
        _sync(device)
        middle = time.perf_counter()
        _batch_token_nll(model, batch, begin == 0, stride)
        _sync(device)
        bare, full = bare + middle - start, full + time.perf_counter() - middle
    tokens = chunks.numel()
    return {"tokens": tokens, "eval_tokens_per_s": tokens / full, "forward_tokens_per_s": tokens / bare}


# --------------------------------------------------------------------------- loading and the command


def load_any(name_or_dir: str, runtime: bool = False) -> tuple[nn.Module, object, str | None]:
    """Load an original, a decoded export or a compact export, with its tokenizer.

    With ``runtime`` a compact export is loaded in its run-time form (weights
    decoded just in time, see :mod:`aecompress.runtime`), so quality is measured
    exactly as that form runs.

    Returns:
        The model in eval mode, its tokenizer, and the name of the original model for an
        export (``source_model`` in its ``aecompress.json``), else ``None``.
    """
    from aecompress.compact import load_compact
    from aecompress.export import SIDECAR
    from aecompress.loading import auto_class, load_model, read_json

    path = Path(name_or_dir).expanduser()
    if path.is_dir() and (path / SIDECAR).is_file():
        meta = read_json(path / SIDECAR)
        fmt = meta.get("format")
        if fmt == "aecompress-compact":
            model = load_compact(path, materialize=not runtime)
        elif fmt == "aecompress-decoded":
            model = auto_class(meta.get("auto_class", "AutoModel")).from_pretrained(path, dtype=torch.float32)
        else:
            raise AECompressError(f"{str(path)!r} holds unknown format {fmt!r}; valid: aecompress-decoded, aecompress-compact")
        tokenizer = load_tokenizer(path if _has_tokenizer(path) else meta.get("source", str(path)))
        return model.eval(), tokenizer, meta.get("source_model")
    if runtime:
        raise AECompressError(
            f"--runtime needs a compact export, and {name_or_dir!r} is not one; "
            "write it with aecompress export --format compact"
        )
    model, source, _ = load_model(name_or_dir)
    return model, load_tokenizer(source), None


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


def load_tokenizer(source):
    """A tokenizer from a directory or hub id, with a one-line error."""
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise AECompressError(f"cannot load a tokenizer from {str(source)!r}: {str(err).splitlines()[0]}") from err


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise AECompressError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AECompressError(f"device {device!r} asked for, but no CUDA GPU is available; use cpu or auto")
    return resolved


def _compare(items: dict[str, torch.Tensor], runtime: bool, target: torch.device, tokenizer, against: str,
             data: str, wanted: list[str], **options) -> dict[str, float]:
    """Measure ``against`` on the same items; its values as ``<metric>_against``, the paired z as ``<metric>_z``."""
    other_model, _, _ = load_any(against, runtime)
    other_items: dict[str, torch.Tensor] = {}
    theirs = evaluate_model(other_model.to(target), tokenizer, data, wanted, **options, items=other_items)
    del other_model
    out = {f"{m}_against": v for m, v in theirs.items()}
    for name, scores in items.items():
        if other_items[name].shape != scores.shape:
            raise AECompressError(f"{against} was measured on {len(other_items[name])} items of {name}, "
                                  f"the model on {len(scores)}; compare models that share a tokenizer")
        out[f"{name}_z"] = paired_z(name, scores, other_items[name])
    print(f"against: {against}")
    print(format_table(out))
    return out


def format_table(results: dict[str, float]) -> str:
    """A two-column text table of metric values."""
    width = max(len("metric"), *(len(k) for k in results))
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    lines += [f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in results.items()]
    return "\n".join(lines)


def evaluate_command(
    model: str,
    data: str = "wiki:validation",
    metrics: list[str] | str | None = None,
    json: str | None = None,  # noqa: A002 - the flag users type is --json
    max_tokens: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    device: str = "auto",
    throughput: bool = False,  # noqa: A002 - the flag users type is --throughput
    runtime: bool = False,
    against: str | None = None,
) -> dict[str, float]:
    """Measure a model (original, decoded export or compact export) on text.

    Args:
        model: a packaged name (minilm-l6, smollm2-135m), a hub id, a model directory,
            or a directory written by ``aecompress export``.
        data: a data spec: wiki:validation, wiki:test, wiki:calibration, wiki:all, calibration,
            lee, polarity, or PATH:SPLIT for your own text; may end with a token slice
            such as wiki:all[:4096].
        metrics: metric names, comma-separated (perplexity, mlm_perplexity, embedding_fidelity,
            lee_pearson, lee_spearman, polarity_accuracy); default: those that fit the model and the data.
        json: also write the results as JSON to this file.
        max_tokens: use only the first this many tokens of the data.
        window: tokens per sequence (default 512 for perplexity, 128 for masked LM).
        stride: tokens between window starts for perplexity (default: the window).
        batch_size: sequences per forward pass.
        seed: masking seed for mlm_perplexity.
        device: auto, cpu, cuda or cuda:N.
        throughput: also time the perplexity loop against a bare forward pass over the same windows.
        runtime: load a compact export in its run-time form (decoded just in time), to
            measure quality as it will run.
        against: another model (any form ``--model`` takes) measured on the same items: its
            values, and for perplexity and embedding fidelity how many standard errors of the
            paired per-item difference ``--model`` is better by (negative: worse), so a small
            difference between two compressed models can be told from noise.
    """
    import json as json_lib

    target = _resolve_device(device)
    text.parse_spec(data)  # a bad spec fails before any model is loaded
    if max_tokens is not None and max_tokens < 2:
        raise AECompressError(f"max_tokens must be at least 2, got {max_tokens}")
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    hf_model, tokenizer, reference_name = load_any(model, runtime)
    hf_model.to(target)
    wanted = metrics if metrics is not None else default_metrics(hf_model, data, reference_name is not None)
    check_metrics(wanted, hf_model, reference_name is not None)
    reference = None
    if "embedding_fidelity" in wanted:
        from aecompress.loading import load_model

        reference = load_model(reference_name)[0].to(target)
    start = time.perf_counter()
    items: dict[str, torch.Tensor] = {}
    results = evaluate_model(hf_model, tokenizer, data, wanted, reference, max_tokens, window, stride, batch_size, seed,
                             items=items)
    seconds = time.perf_counter() - start
    header = f"model: {model}" + (f" (original: {reference_name})" if reference_name else "") + f"   data: {data}"
    print(header)
    print(format_table(results))
    print(f"({seconds:.1f} s on {target})")
    out: dict[str, float] = dict(results)
    if against:
        other = dict(against=against, data=data, wanted=wanted, reference=reference, max_tokens=max_tokens,
                     window=window, stride=stride, batch_size=batch_size, seed=seed)
        out.update(_compare(items, runtime, target, tokenizer, **other))
    if throughput:
        if model_kind(hf_model) != "causal_lm":
            raise AECompressError(f"--throughput times the perplexity loop, which {type(hf_model).__name__} cannot run")
        ids = text.token_ids(data, tokenizer)
        ids = ids[:max_tokens] if max_tokens else ids
        w = _window(hf_model, window, 512)
        speed = measure_throughput(hf_model, ids, w, stride or w, batch_size)
        print(f"throughput over {speed['tokens']} tokens: evaluation {speed['eval_tokens_per_s']:.0f} tokens/s, "
              f"bare forward {speed['forward_tokens_per_s']:.0f} tokens/s "
              f"(overhead {100 * (speed['forward_tokens_per_s'] / speed['eval_tokens_per_s'] - 1):.1f} %)")
        out.update(eval_tokens_per_s=speed["eval_tokens_per_s"], forward_tokens_per_s=speed["forward_tokens_per_s"])
    if json:
        Path(json).parent.mkdir(parents=True, exist_ok=True)
        Path(json).write_text(json_lib.dumps(out, indent=2) + "\n")
    return out
