"""``aecompress runtime-bench --new_tokens N``: greedy generation speed and whole-process memory, per model.

A compact export runs in its run-time form (decoded just in time); every other model (a packaged
name, a decoded or compressed-tensors export, any transformers directory) is loaded as transformers
loads it, in float32. Each runs in a fresh process, so the peak resident size printed is that whole
process's (loading included) and no model's allocations inflate another's. One process per model
means other load on the machine is not shared alike: rerun to see the spread. Figures for people,
never asserted by a timed test.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from aecompress.core.memory import peak_rss, status
from aecompress.formats.sidecar import COMPRESSED
from aecompress.formats.sources import resolve
from aecompress.runtime.load import load_runtime


def _load(name: str, kernel: str):
    if (Path(name) / COMPRESSED).is_file():
        return load_runtime(name, kernel=kernel), f"run-time {kernel}"
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve(name), dtype=torch.float32).eval(), "transformers"


def generation(name: str, prompt_tokens: int, new_tokens: int, threads: int, seed: int, kernel: str = "int4") -> dict:
    """Greedy generation of ``new_tokens`` after a random prompt, timed by phase (run in a fresh process)."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model, form = _load(name, kernel)
    loaded_s, rss_loaded = time.perf_counter() - start, status("VmRSS")
    ids = torch.randint(model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill_s = time.perf_counter() - start
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(new_tokens - 1):
            out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        decode_s, decode_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return {"form": form, "load_s": loaded_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "tokens_per_s": (new_tokens - 1) / decode_s if new_tokens > 1 else float("nan"),
            "cpu_s_per_token": decode_cpu_s / max(new_tokens - 1, 1),
            "end_to_end_tokens_per_s": new_tokens / (prefill_s + decode_s),
            "rss_loaded": rss_loaded, "peak_rss_process": peak_rss(), "tokens": torch.cat(tokens, 1)[0].tolist()}


def report(rows: dict[str, dict], prompt_tokens: int, new_tokens: int, threads: int) -> None:
    """Print one line per model: load, prefill, tokens per second after the prompt, memory, same tokens."""
    mib, first = 1 << 20, next(iter(rows.values()))["tokens"]
    print(f"{'model':<34}{'form':<18}{'load':>8}{'prefill':>10}{'tok/s':>8}{'e2e tok/s':>11}{'CPU/token':>11}"
          f"{'RSS loaded':>13}{'peak RSS':>12}  same tokens")
    for name, row in rows.items():
        same = sum(a == b for a, b in zip(row["tokens"], first))
        print(f"{name[-33:]:<34}{row['form']:<18}{row['load_s']:>7.1f}s{row['prefill_s']:>9.2f}s"
              f"{row['tokens_per_s']:>8.2f}{row['end_to_end_tokens_per_s']:>11.2f}{row['cpu_s_per_token'] * 1e3:>8.0f} ms"
              f"{row['rss_loaded'] / mib:>9.0f} MiB{row['peak_rss_process'] / mib:>8.0f} MiB  {same}/{len(first)}")
    print(f"greedy, {prompt_tokens}-token random prompt, {new_tokens} new tokens, {threads} threads, one fresh "
          "process per model; tok/s counts the tokens after the first (the prompt's forward is 'prefill'); "
          "CPU/token is the process's CPU time per such token, all threads (steadier than tok/s on a shared machine)")
