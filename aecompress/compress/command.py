"""``aecompress compress``: a whole model by a method that is not trained, written as an export.

``fit`` trains autoencoders; the closed-form methods (``compensated``, ``quantize``, the
factorizations) need no training, only calibration statistics, so one command compresses every
selected weight at a budget in bits per weight and writes the same decoded or compact export as
``aecompress export``. It goes through :func:`aecompress.compress.pipeline.closed_form`, the path the
benchmark measures, so the export is exactly the model a benchmark row of the same method, options and
budget measured.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import get_args

from lightning.pytorch.utilities import rank_zero_only

import aecompress.methods as catalogue
from aecompress.compress.blockwise import compress_blockwise
from aecompress.compress.choices import MethodChoice
from aecompress.compress.memory_plan import open_model, parse_bytes
from aecompress.compress.pipeline import check_tune, closed_form, tuned
from aecompress.compress.provenance import card_info
from aecompress.compress.tuning import checked_options
from aecompress.core.budget import Budget, bits_per_weight
from aecompress.core.errors import AECompressError
from aecompress.core.files import check_target
from aecompress.core.memory import give_back, peak_rss, reset_peak
from aecompress.data.calibration import Calibration
from aecompress.evaluation import allocation as allocator
from aecompress.formats.export import check_dtype, export, refuse_own_source
from aecompress.formats.sidecar import ExportFormat
from aecompress.formats.sources import load_model

FORMATS = get_args(ExportFormat)


def _checked(method: str, allocation: str, fmt: str, options: dict | None, modules: list[str] | None,
             dtype: str) -> None:
    """One clear error for a method that is trained or foreign, a budget out of range, or an unknown choice."""
    closed = sorted(catalogue.compressors())
    if method not in closed:
        raise AECompressError(f"--method {method!r} is not a closed-form method; valid: {', '.join(closed)} "
                              "(autoencoders are trained: aecompress fit)")
    unknown = catalogue.get(method).unknown(options or {})
    if unknown:
        raise AECompressError(f"--options {unknown[0]!r} is not an option of {method}; valid: "
                              f"{', '.join(catalogue.options(method))}")
    if modules is not None and not modules:  # [] would otherwise select nothing, or (as a default) everything
        raise AECompressError("--modules [] is empty; give module types or patterns, e.g. [all] or [q_proj, k_proj]")
    if allocation not in allocator.ALLOCATIONS:
        raise AECompressError(f"--allocation {allocation!r} is not one of: {', '.join(allocator.ALLOCATIONS)}")
    if fmt not in FORMATS:
        raise AECompressError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    check_dtype(dtype, fmt)


def compress(
    model: str,
    out_dir: str,
    bits: float = 3.0,
    method: str = catalogue.BEST_CLOSED_FORM,
    options: dict | None = None,
    modules: list[str] | None = None,
    allocation: str = "uniform",
    calibration: str = "calibration",
    calibration_tokens: int = 32768,
    calibration_window: int = 512,
    tune_steps: int | None = None,
    tune_lr: float = 1e-3,
    top_k: int | None = 64,
    precision: str = "32-true",
    tune_batch_size: int = 1,
    accelerator: str = "auto",
    devices: int = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
    tune_timeout: int | None = None,
    format: str = "decoded",
    dtype: str = "float32",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    mode: str = "concatenated",
    max_memory: int | str | None = None,
    blockwise: bool | None = None,
    sequential: bool = False,
    model_tune_steps: int = 0,
    model_tune_lr: float | None = None,
) -> Path:
    """Compress every selected weight of a model at a budget in bits per weight, with no training, and export it.

    Args:
        model: a local directory, hub id or packaged name (``smollm2-135m``, ``minilm-l6``).
        out_dir: the export directory (refused if it exists, unless ``overwrite``).
        bits: stored bits per weight over the selected weights, counted by the one accountant.
        method: a closed-form method (``compensated``, ``quantize``, ``svd``, ``whitened_svd``...).
        options: the method's options; default for ``compensated``: ``{group_size: auto, fill: true}``.
        modules: module types or patterns, as ``data.modules``; default ``[all]``: every attention and MLP weight.
        allocation: ``uniform`` (every group the same budget) or ``measured`` (by sensitivity per byte
            on calibration text, the same total).
        calibration: text for the calibration statistics (never a test split).
        calibration_tokens: at most this many calibration tokens.
        calibration_window: tokens per calibration window.
        tune_steps: steps of the whole-model fine-tune of the codes' scales against the original's outputs on
            the calibration windows (``quantize``, ``compensated``); 0: none; default: 100 for ``compensated``, else 0.
        tune_lr: the tuning's learning rate.
        top_k: next-token targets of the original kept per position while tuning (bounded memory); null: all.
        precision: the tuning's Lightning precision: ``32-true``, or ``bf16-mixed`` on a GPU.
        tune_batch_size: calibration windows per tuning step, per process (with ``devices: 2``, two such batches a step).
        accelerator: the tuning's Trainer accelerator (``auto``, ``cpu``, ``gpu``), as ``fit``'s ``--trainer.*``.
        devices: the tuning's devices (processes) per node; above 1 with ``strategy: ddp``, Lightning's launcher
            starts the others, each running this command again up to the tune; only rank 0 exports.
        strategy: the tuning's Trainer strategy: ``auto`` or ``ddp`` (Lightning's launcher).
        num_nodes: the tuning's nodes (under SLURM or torchrun, as ``fit``).
        tune_timeout: seconds the tune's processes wait for one another (DDP's process-group timeout); default
            Lightning's 30 minutes. The processes the launcher starts redo the loading, calibration and compression
            while rank 0 waits: raise it where that takes longer.
        format: ``decoded`` (plain transformers loads it), ``compact`` (only what is stored) or
            ``compressed-tensors`` (integer codes in its ``pack-quantized`` layout, which transformers and vLLM
            load; ``quantize`` or ``compensated`` with ``fill: false`` only).
        dtype: the decoded format's weights: ``float32``, ``float16`` or ``bfloat16`` (half the files).
        overwrite: replace an existing ``out_dir``.
        trust_remote_code: allow a hub model's own code (off by default).
        mode: ``concatenated`` (one group per module type, across layers) or ``separated`` (one per matrix; block by
            block needs it, as each group must lie in one block).
        max_memory: a ceiling in bytes (``6GB``, ``500MB``, ``2GiB``) planned against before anything is read: the
            whole model if it fits, else block by block, else one line naming what does not fit (docs/scaling.md).
        blockwise: compress one transformer block at a time (true) or the whole model at once (false); default:
            whatever ``max_memory`` allows, the whole model without it.
        sequential: block by block, feed each block the outputs of the blocks before it already compressed (as
            GPTQ does) rather than the original's.
        model_tune_steps: block by block, then this many steps of the whole-model tune (the ``--tune_*``
            settings, ``model_tune_lr`` its rate), starting from the blocks' forms. It loads the whole model, so the plan
            counts it against ``max_memory``; 0: none. The whole-model path's tune is ``tune_steps``.
        model_tune_lr: that tune's learning rate; default ``tune_lr`` (the block tune's).
    """
    # Every argument that shapes the model, in order: the card's command spells each out, defaults included.
    settings = {k: v for k, v in locals().items() if k not in ("overwrite", "trust_remote_code")}
    target = Budget.of_bits(bits, "--bits")
    _checked(method, allocation, format, options, modules, dtype)
    row = catalogue.get(method)
    steps = row.tune_steps if tune_steps is None else tune_steps
    settings.update(options=dict(row.defaults) if options is None else options, modules=modules or ["all"],
                    tune_steps=steps)
    tune_settings = checked_options({"steps": steps, "lr": tune_lr, "batch_size": tune_batch_size, "top_k": top_k,
                                     "precision": precision,
                                     "accelerator": accelerator, "devices": devices, "strategy": strategy,
                                     "num_nodes": num_nodes, "timeout": tune_timeout})  # even unused
    choice = MethodChoice(method=method, options=settings["options"], allocation=allocation,
                          tune=tune_settings if steps else {})
    check_tune(choice)
    model_tune = checked_options({**tune_settings, "steps": model_tune_steps,  # even unused
                                  "lr": tune_lr if model_tune_lr is None else model_tune_lr})
    model_tune = model_tune if model_tune_steps else {}
    check_tune(dataclasses.replace(choice, tune=model_tune))
    check_target(Path(out_dir), overwrite)
    started = time.perf_counter()
    opened = open_model(model, modules or ["all"], mode, choice, target, parse_bytes(max_memory), blockwise,
                        calibration_tokens, trust_remote_code, model_tune, calibration_window)
    net, source, auto_class, groups = opened.model, opened.source, opened.auto_class, opened.groups
    refuse_own_source(source, out_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    windows = Calibration(net, tokenizer, calibration, calibration_tokens, calibration_window, cache_key=source)
    windows.windows()  # too little text, or text shared with a test split, is refused before anything is computed
    for kind in catalogue.get(method).needs if opened.files is None else ():  # timed apart from compressing
        windows.stats(groups, kind)
    loaded = time.perf_counter()
    if opened.files is not None:
        forms = compress_blockwise(net, opened.files, windows, choice, groups, target, sequential)
    else:
        forms, _ = closed_form(net, windows, dataclasses.replace(choice, tune={}), groups, target,
                               lambda: allocator.damage_on(net, tokenizer, calibration))
    made, before_tune = time.perf_counter(), peak_rss()
    reset_peak()  # the tuning's own high-water mark, on top of the model and statistics already held
    if opened.files is None:
        forms = tuned(net, windows, choice, forms)
    elif model_tune:  # block by block tuned each block as it went; the plan counted the whole model for this tune
        forms = tuned(load_model(model, trust_remote_code=trust_remote_code)[0], windows,
                      dataclasses.replace(choice, tune=model_tune), forms)
        give_back()
    if rank_zero_only.rank != 0:  # a process Lightning's launcher started for the tune: rank 0 writes
        return Path(out_dir)
    tune_peak, peak = peak_rss(), max(before_tune, peak_rss())
    stored = sum(f.bytes for f in forms)
    print(f"{method}: {bits_per_weight(stored, sum(g.rows * g.width for g in groups)):.3f} bits per weight stored "
          f"over {sum(len(g.members) for g in groups)} weights ({stored:,} bytes)", flush=True)
    compressed = time.perf_counter()
    info = card_info(settings, choice, options is None, windows.windows().numel(), forms, model_tune)
    written = export(net, {f.group.name: f for f in forms}, source, auto_class, model, out_dir, format, overwrite,
                     card_info=info, dtype=dtype, files=opened.files)
    print(f"seconds: load and calibration {loaded - started:.1f}, compress {made - loaded:.1f}, "
          f"tune {compressed - made:.1f}, export {time.perf_counter() - compressed:.1f}; peak resident memory "
          f"{max(peak, peak_rss()) / 2**20:,.0f} MB (tune {tune_peak / 2**20:,.0f} MB); wrote {out_dir}", flush=True)
    return written
