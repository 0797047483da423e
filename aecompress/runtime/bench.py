"""``aecompress runtime-bench``: the run-time form against the decoded form, measured.

Memory is read per form in a fresh process (so one form's allocations never
inflate the other's peak), latency in one process that alternates the two
(so other load on the machine hits both alike). These are benchmark figures
printed for people, never asserted by timed tests.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from aecompress.blocks.int4_kernel import check_kernel
from aecompress.core.errors import AECompressError
from aecompress.core.memory import peak_rss, reset_peak, status
from aecompress.formats.compact import load_compact
from aecompress.formats.sidecar import read_compact
from aecompress.runtime.generate import generation, report
from aecompress.runtime.load import load_runtime

__all__ = ["bench", "generation", "measure", "resident_bytes", "time_forms"]  # generation: run by _child


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer the model holds (tied tensors once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    kwargs = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    out = model(input_ids=ids, **kwargs)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


def measure(directory: str, form: str, tokens: int, threads: int, cache: bool | int, seed: int, save: str) -> dict:
    """Load one form and measure the memory of one forward pass (run in a fresh process by :func:`bench`)."""
    torch.set_num_threads(threads)
    model = load_compact(directory) if form == "decoded" else load_runtime(directory, cache)
    gc.collect()
    ids = _random_ids(model, tokens, seed)
    loaded = status("VmRSS")
    reset = reset_peak()
    with torch.inference_mode():
        out = _forward(model, ids)
    peak = peak_rss()
    torch.save(out, save)
    return {"resident_bytes": resident_bytes(model), "rss_loaded": loaded, "peak_rss_forward": peak,
            "peak_is_forward_only": reset}


def time_forms(directory: str, tokens: int, repeats: int, threads: int, cache: bool | int, seed: int) -> dict:
    """Forward latency of both forms in one process, alternating, so load on the machine hits both alike."""
    torch.set_num_threads(threads)
    models = {"decoded": load_compact(directory), "runtime": load_runtime(directory, cache)}
    ids = _random_ids(models["decoded"], tokens, seed)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            _forward(model, ids)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                _forward(model, ids)
                times[name].append(time.perf_counter() - start)
    ratios = [r / d for r, d in zip(times["runtime"], times["decoded"])]
    return {"decoded_s": statistics.median(times["decoded"]), "runtime_s": statistics.median(times["runtime"]),
            "latency_ratio": statistics.median(ratios)}


def _random_ids(model: nn.Module, tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))


def _child(function: str, *args, threads: int) -> dict:
    code = (f"import json,sys; from aecompress.runtime.bench import {function}; "
            f"print(json.dumps({function}(*json.loads(sys.argv[1]))))")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise AECompressError(f"benchmark step {function} on {args[0]!r} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench(
    directory: str, tokens: int = 512, repeats: int = 5, threads: int = 2, cache: bool | int = False, seed: int = 0,
    new_tokens: int = 0, compare: list[str] | None = None, kernel: str = "int4",
) -> dict:
    """Compare a compact export's run-time form with its decoded form: memory, speed, outputs.

    With ``--new_tokens N`` it measures greedy generation instead: a ``tokens``-long random prompt,
    then N new tokens, for the compact export in its run-time form and for each model in
    ``--compare`` (loaded by transformers in float32), each in a fresh process: tokens per second,
    prefill time and the whole process's peak resident size.

    Memory is measured for each form in a fresh process: resident parameter
    bytes, RSS after loading, and peak RSS during one forward pass. Latency is
    timed in one process holding both forms, alternating their forward passes
    so that other load on the machine hits both alike. These are benchmark
    figures, not tests.

    Args:
        directory: a directory written by ``aecompress export --format compact``.
        tokens: length of the one random input sequence.
        repeats: timed forward passes of each form, after one warm-up (medians are reported).
        threads: CPU threads for torch in each measuring process.
        cache: run the run-time form with its decode cache (``true``: all, or a byte budget).
        seed: seeds the random input tokens.
        new_tokens: 0 compares forward passes; N > 0 measures generation of N tokens after the prompt.
        compare: with ``new_tokens``, other models measured beside the export (packaged names or directories).
        kernel: with ``new_tokens``, how the export's run-time form multiplies each new token: ``int4`` (torch's
            fused kernel for grid codes of up to 4 bits, in bfloat16) or ``float32`` (exact decode).
    """
    check_kernel(kernel)
    path = Path(directory)
    if not path.is_dir():
        raise AECompressError(f"export directory {directory!r} does not exist")
    read_compact(path)  # one line saying what to do, for a decoded export or a plain checkpoint
    if tokens < 1 or repeats < 1 or threads < 1:
        raise AECompressError(f"tokens, repeats and threads must be positive, got {tokens}, {repeats}, {threads}")
    if new_tokens < 0 or (compare and not new_tokens):
        raise AECompressError(f"new_tokens must be 0 or more, and positive with --compare; got {new_tokens}")
    if new_tokens:
        rows = {name: _child("generation", name, tokens, new_tokens, threads, seed, kernel, threads=threads)
                for name in [*(compare or []), str(path)]}
        report(rows, tokens, new_tokens, threads)
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        rows = {f: _child("measure", str(path), f, tokens, threads, cache, seed, f"{tmp}/{f}.pt", threads=threads)
                for f in ("decoded", "runtime")}
        decoded, runtime = (torch.load(f"{tmp}/{f}.pt") for f in ("decoded", "runtime"))
    timing = _child("time_forms", str(path), tokens, repeats, threads, cache, seed, threads=threads)
    diff = float((decoded - runtime).abs().max())
    scale = float(decoded.abs().max())
    d, r = rows["decoded"], rows["runtime"]
    result = {
        **{f"{k}_{f}": v for f, row in rows.items() for k, v in row.items()},
        **timing,
        "resident_ratio": d["resident_bytes"] / r["resident_bytes"],
        "max_abs_diff": diff, "max_abs_output": scale,
    }
    mib = 1 << 20
    print(f"{'form':<10}{'resident params':>18}{'RSS loaded':>14}{'peak RSS fwd':>15}{'median fwd':>13}")
    for form, row in rows.items():
        print(f"{form:<10}{row['resident_bytes'] / mib:>14.2f} MiB{row['rss_loaded'] / mib:>10.1f} MiB"
              f"{row['peak_rss_forward'] / mib:>11.1f} MiB{timing[form + '_s'] * 1e3:>10.1f} ms")
    print(f"resident params: decoded / run-time = {result['resident_ratio']:.2f}x; "
          f"latency: run-time / decoded = {timing['latency_ratio']:.2f}x "
          f"({tokens} tokens, {threads} threads, median of {repeats} alternating pairs)")
    print(f"outputs: max |decoded - run-time| = {diff:.3g} (max |output| {scale:.3g})")
    return result
