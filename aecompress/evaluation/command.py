"""``aecompress evaluate``: measure a model on text, optionally against another on the same items."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from aecompress.core.errors import AECompressError
from aecompress.data.specs import parse_spec
from aecompress.data.tokens import token_ids
from aecompress.evaluation.catalog import FIDELITY_METRICS, OWN_TOKENS, window_for
from aecompress.evaluation.metrics import check_metrics, default_metrics, evaluate_model, targets_for
from aecompress.evaluation.models import load_any, tokenizer_of
from aecompress.evaluation.paired import paired_z
from aecompress.evaluation.throughput import measure_throughput
from aecompress.formats.sources import load_model, model_kind

log = logging.getLogger(__name__)


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


def _against_tokenizer(against: str):
    """The ``--against`` model's own tokenizer, loaded before anything is measured: a bad name fails first."""
    try:
        return tokenizer_of(against)
    except AECompressError as err:
        raise AECompressError(f"--against: {err}") from err


def _check_same_tokens(data: str, wanted: list[str], ours, theirs, against: str, max_tokens: int | None) -> None:
    """Refuse ``--against`` a model that tokenizes the data differently, unless every metric asked for is per model.

    Per-token metrics pair the two models token by token, and the fidelity metrics compare both
    with the first model's original on its tokens, so both models must read the same tokens.
    """
    shared = [m for m in wanted if m not in OWN_TOKENS]
    if not shared:
        return
    a, b = token_ids(data, ours)[:max_tokens], token_ids(data, theirs)[:max_tokens]
    if a.shape == b.shape and torch.equal(a, b):
        return
    first = next((i for i, (x, y) in enumerate(zip(a.tolist(), b.tolist())) if x != y), min(len(a), len(b)))
    raise AECompressError(
        f"--against {against!r} tokenizes the data differently from --model ({len(b)} tokens vs {len(a)}, the first "
        f"difference at token {first}); for {', '.join(shared)} both models must read the same tokens, so they must "
        f"share a tokenizer; models of different tokenizers compare on {', '.join(OWN_TOKENS)} (--metrics), "
        "each with its own"
    )


def _compare(items: dict[str, torch.Tensor], runtime: bool, target: torch.device, tokenizer, against: str,
             data: str, wanted: list[str], **options) -> dict[str, float]:
    """Measure ``against`` with its own ``tokenizer`` on the same items; its values as ``<metric>_against``,
    the paired z as ``<metric>_z``."""
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
    reference: str | None = None,
) -> dict[str, float]:
    """Measure a model (original, decoded export or compact export) on text.

    Args:
        model: a packaged name (minilm-l6, smollm2-135m), a hub id, a model directory,
            or a directory written by ``aecompress export``.
        data: a data spec: wiki:validation, wiki:test, wiki:calibration, wiki:all, calibration,
            lee, polarity, or PATH:SPLIT for your own text; may end with a token slice
            such as wiki:all[:4096].
        metrics: metric names, comma-separated (kl_to_original, kl_to_original_p99, top1_agreement,
            perplexity, mlm_perplexity, embedding_fidelity,
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
            difference between two compressed models can be told from noise. It runs with its
            own tokenizer; the per-token and fidelity metrics need both models to tokenize the
            data alike and refuse otherwise (lee and polarity compare any two models).
        reference: the original model, for embedding fidelity; default: the one the export's
            aecompress.json names (a packaged name or hub id; an export of a local directory
            names it by its directory name only, so give the directory here).
    """
    import json as json_lib

    target = _resolve_device(device)
    parse_spec(data)  # a bad spec fails before any model is loaded
    if max_tokens is not None and max_tokens < 2:
        raise AECompressError(f"max_tokens must be at least 2, got {max_tokens}")
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    theirs = _against_tokenizer(against) if against else None
    hf_model, tokenizer, reference_name = load_any(model, runtime)
    reference_name = named = reference or reference_name
    hf_model.to(target)
    loaded = _original(reference_name, required=metrics is not None) if reference_name else None
    if reference_name and loaded is None:
        reference_name = None  # by default, measure what needs no original (one warning said how to add it)
    wanted = metrics if metrics is not None else default_metrics(hf_model, data, reference_name is not None)
    check_metrics(wanted, hf_model, reference_name is not None)
    if against:
        _check_same_tokens(data, wanted, tokenizer, theirs, against, max_tokens)
    original = None
    if "embedding_fidelity" in wanted:
        original = loaded.to(target)
    if any(m in FIDELITY_METRICS for m in wanted):  # the original runs once; both models compare with its targets
        ids = token_ids(data, tokenizer)
        original = targets_for(loaded.to(target), ids[:max_tokens] if max_tokens else ids, window, stride, batch_size)
    del loaded
    start = time.perf_counter()
    items: dict[str, torch.Tensor] = {}
    results = evaluate_model(hf_model, tokenizer, data, wanted, original, max_tokens, window, stride, batch_size, seed,
                             items=items)
    seconds = time.perf_counter() - start
    header = f"model: {model}" + (f" (original: {named})" if named else "") + f"   data: {data}"
    print(header)
    print(format_table(results))
    print(f"({seconds:.1f} s on {target})")
    out: dict[str, float] = dict(results)
    if against:
        other = dict(against=against, data=data, wanted=wanted, reference=original, max_tokens=max_tokens,
                     window=window, stride=stride, batch_size=batch_size, seed=seed)
        out.update(_compare(items, runtime, target, theirs, **other))
    if throughput:
        if model_kind(hf_model) != "causal_lm":
            raise AECompressError(f"--throughput times the perplexity loop, which {type(hf_model).__name__} cannot run")
        ids = token_ids(data, tokenizer)
        ids = ids[:max_tokens] if max_tokens else ids
        w = window_for(hf_model, window, 512)
        speed = measure_throughput(hf_model, ids, w, stride or w, batch_size)
        print(f"throughput over {speed['tokens']} tokens: evaluation {speed['eval_tokens_per_s']:.0f} tokens/s, "
              f"bare forward {speed['forward_tokens_per_s']:.0f} tokens/s "
              f"(overhead {100 * (speed['forward_tokens_per_s'] / speed['eval_tokens_per_s'] - 1):.1f} %)")
        out.update(eval_tokens_per_s=speed["eval_tokens_per_s"], forward_tokens_per_s=speed["forward_tokens_per_s"])
    if json:
        Path(json).parent.mkdir(parents=True, exist_ok=True)
        Path(json).write_text(json_lib.dumps(out, indent=2) + "\n")
    return out


def _original(name: str, required: bool):
    """The original model an export names (or ``--reference``): an error if metrics asked for it, else a warning."""
    try:
        return load_model(name)[0]
    except AECompressError as err:
        message = f"cannot load the original {name!r} ({err}); give its directory with --reference"
        if required:
            raise AECompressError(message) from err
        log.warning("%s to measure fidelity to it; measuring the rest", message)
        return None
