"""``aecompress compress``: a whole model by a method that is not trained, written as an export.

``fit`` trains autoencoders; the closed-form methods (``compensated``, ``quantize``, the
factorizations) need no training, only calibration statistics, so one command compresses every
selected weight at a budget in bits per weight and writes the same decoded or compact export as
``aecompress export``. It shares the benchmark's path (:func:`aecompress.benchmark.run.closed_form`),
so the export is exactly the model a benchmark row of the same method, options and budget measured.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import get_args

import aecompress.methods as catalogue
from aecompress.benchmark.choices import MethodChoice
from aecompress.benchmark.run import closed_form
from aecompress.core.budget import bits_per_weight
from aecompress.core.errors import AECompressError
from aecompress.core.files import check_target
from aecompress.core.selection import select_groups
from aecompress.data.calibration import Calibration
from aecompress.evaluation import allocation as allocator
from aecompress.formats.export import export, refuse_own_source
from aecompress.formats.sidecar import ExportFormat
from aecompress.formats.sources import load_model
from aecompress.training.datamodule import BITS_PER_ORIGINAL

DEFAULT_OPTIONS = {"compensated": {"group_size": "auto", "fill": True}}
"""Options a method gets when none are given: the best recipe measured (see docs/results.md)."""
FORMATS = get_args(ExportFormat)


def _checked(method: str, bits: float, allocation: str, fmt: str) -> None:
    """One clear error for a method that is trained or foreign, a budget out of range, or an unknown choice."""
    closed = sorted(n for n, m in catalogue.METHODS.items() if m.compress is not None and m.budgeted)
    if method not in closed:
        raise AECompressError(f"--method {method!r} is not a closed-form method; valid: {', '.join(closed)} "
                              "(autoencoders are trained: aecompress fit)")
    if not 0 < bits < BITS_PER_ORIGINAL:
        raise AECompressError(f"--bits {bits!r} must be above 0 and below {BITS_PER_ORIGINAL}")
    if allocation not in allocator.ALLOCATIONS:
        raise AECompressError(f"--allocation {allocation!r} is not one of: {', '.join(allocator.ALLOCATIONS)}")
    if fmt not in FORMATS:
        raise AECompressError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")


def compress(
    model: str,
    out_dir: str,
    bits: float = 3.0,
    method: str = "compensated",
    options: dict | None = None,
    modules: list[str] | None = None,
    allocation: str = "uniform",
    calibration: str = "calibration",
    calibration_tokens: int = 8192,
    calibration_window: int = 512,
    format: str = "decoded",
    overwrite: bool = False,
    trust_remote_code: bool = False,
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
        format: ``decoded`` (plain transformers loads it) or ``compact`` (only what is stored).
        overwrite: replace an existing ``out_dir``.
        trust_remote_code: allow a hub model's own code (off by default).
    """
    _checked(method, bits, allocation, format)
    check_target(Path(out_dir), overwrite)
    started = time.perf_counter()
    choice = MethodChoice(method=method, options=DEFAULT_OPTIONS.get(method, {}) if options is None else options,
                          allocation=allocation)
    net, source, auto_class = load_model(model, trust_remote_code=trust_remote_code)
    refuse_own_source(source, out_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    groups = select_groups(net, modules or ["all"])
    windows = Calibration(net, tokenizer, calibration, calibration_tokens, calibration_window, cache_key=source)
    for kind in catalogue.get(method).needs:  # made (or read from the cache) here, so its time is told apart
        windows.stats(groups, kind)
    loaded = time.perf_counter()
    forms, _ = closed_form(net, windows, choice, groups, BITS_PER_ORIGINAL / bits,
                           lambda: allocator.damage_on(net, tokenizer, calibration))
    stored = sum(f.bytes for f in forms)
    print(f"{method}: {bits_per_weight(stored, sum(g.rows * g.width for g in groups)):.3f} bits per weight stored "
          f"over {sum(len(g.members) for g in groups)} weights ({stored:,} bytes)", flush=True)
    compressed = time.perf_counter()
    command = "aecompress compress " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    written = export(net, {f.group.name: f for f in forms}, source, auto_class, model, out_dir, format, overwrite,
                     card_info={"commands": [command]})
    print(f"seconds: load and calibration {loaded - started:.1f}, compress {compressed - loaded:.1f}, "
          f"export {time.perf_counter() - compressed:.1f}; wrote {out_dir}", flush=True)
    return written
