"""How fast the perplexity loop runs, against a bare forward pass over the same windows."""

from __future__ import annotations

import time

import torch
from torch import nn

from aecompress.data.tokens import windows
from aecompress.evaluation.catalog import device_of
from aecompress.evaluation.causal import batch_token_nll


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
    chunks = windows(ids, window, stride)
    device = device_of(model)
    model(input_ids=chunks[:batch_size].to(device), use_cache=False)
    bare = full = 0.0
    for begin in range(0, len(chunks), batch_size):
        batch = chunks[begin : begin + batch_size].to(device)
        _sync(device)
        start = time.perf_counter()
        model(input_ids=batch, use_cache=False)
        _sync(device)
        middle = time.perf_counter()
        batch_token_nll(model, batch, begin == 0, stride)
        _sync(device)
        bare, full = bare + middle - start, full + time.perf_counter() - middle
    tokens = chunks.numel()
    return {"tokens": tokens, "eval_tokens_per_s": tokens / full, "forward_tokens_per_s": tokens / bare}
