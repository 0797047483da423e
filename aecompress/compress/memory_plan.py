"""``--max_memory``: what ``compress`` plans against before it starts, and which path it takes.

A ceiling is checked before any weight is read, from the model's skeleton (names and shapes, no storage): the
whole-model path holds the float32 model, every selected group's rows, statistics and decoded rows; block by block
holds the body outside the blocks, the largest block (its weights and its groups' rows), that block's statistics,
the calibration activations between blocks, the stored forms and what the export streams. Both add a fixed part for
the interpreter, torch, transformers and the tokenizer. These are estimates, meant to pick a path and to refuse a
ceiling that cannot be met, in one line, before hours are spent; the command prints the peak it measured.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from torch import nn

import aecompress.methods as catalogue
from aecompress.compress.blockwise import block_groups, check_blockwise
from aecompress.compress.choices import MethodChoice
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.selection import select_groups
from aecompress.formats.blocks import BlockReader
from aecompress.formats.lazy import TensorFiles, open_lazy
from aecompress.formats.sources import load_model

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
FIXED = 700 * 10**6
"""The interpreter, torch, transformers and a tokenizer, resident before any weight (measured about 0.6 GB)."""
FLOAT32, FLOAT64 = 4, 8
WHOLE_PATH_TUNE = ("--model_tune_steps follows a block by block compression, and this takes the whole-model path, "
                   "whose tune is --tune_steps: give --model_tune_steps 0, or --blockwise true")


def parse_bytes(value: int | str | None, what: str = "--max_memory") -> int | None:
    """Bytes from ``6GB``, ``500MB``, ``2GiB`` or a plain number of bytes (GB = 10⁹ bytes, GiB = 2³⁰)."""
    if value is None:
        return None
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = found[2].upper() if found else ""
    if isinstance(value, bool) or not found or unit not in UNITS or float(found[1]) <= 0:
        raise AECompressError(f"{what} {value!r} is not a size; give a positive number of bytes or one with a unit: "
                              "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. 6GB)")
    return int(float(found[1]) * UNITS[unit])


def gigabytes(size: int) -> str:
    """A size as people read it: ``2.35 GB``, or ``12.5 MB`` below a tenth of a gigabyte."""
    return f"{size / 10**9:.2f} GB" if size >= 10**8 else f"{size / 10**6:.1f} MB"


@dataclass
class Estimate:
    """What one path holds at its peak, part by part, in bytes."""

    path: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        """Bytes in all."""
        return sum(self.parts.values())

    def describe(self) -> str:
        """``about 2.35 GB (float32 model 1.20 GB + ...)``, the parts largest first."""
        parts = " + ".join(f"{name} {gigabytes(size)}" for name, size in
                           sorted(self.parts.items(), key=lambda item: -item[1]) if size)
        return f"about {gigabytes(self.total)} ({parts})"


def _covariances(groups: list[WeightGroup]) -> int:
    """Each member's float64 input covariance, and its running sum while it is made."""
    return sum(2 * FLOAT64 * g.width**2 * len(g.members) for g in groups)


def _working(groups: list[WeightGroup]) -> int:
    """An error-feedback method's copies while it codes its largest matrix: the inverse factor of H and the step
    before it (two float64 width x width matrices), the float64 rows it updates and one update's product."""
    return max((FLOAT64 * (2 * g.width**2 + 2 * (g.rows // len(g.members)) * g.width) for g in groups), default=0)


def _numbers(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def whole(model: nn.Module, groups: list[WeightGroup], measured: bool, target: Budget) -> Estimate:
    """The whole-model path: the model, all groups' rows and statistics, and their decoded rows at export."""
    rows = sum(FLOAT32 * g.rows * g.width for g in groups)
    return Estimate("whole model", {
        "float32 model": FLOAT32 * _numbers(model), "rows of the compressed weights": rows,
        "their statistics": _covariances(groups) if measured else 0, "decoded rows at export": rows,
        "the method's working copies": _working(groups) if measured else 0,
        "stored forms": _stored(groups, target), "fixed": FIXED})


def tune_activations(config, window: int, batch: int) -> int:
    """What a whole-model tune's backward pass holds for one step, roughly: per layer and position about 20 hidden
    widths, 4 MLP widths and one attention row per head, and the logits three times over (a coarse count, meant to
    keep a ceiling from being promised that the tune then breaks)."""
    hidden = getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0)
    per_position = layers * (20 * hidden + 4 * inner + heads * window) + 3 * getattr(config, "vocab_size", 0)
    return FLOAT32 * batch * window * per_position


def _stored(groups: list[WeightGroup], target: Budget) -> int:
    return sum(target.bytes(g.rows, g.width) for g in groups)


def blockwise(model: nn.Module, blocks: nn.ModuleList, per_block: list[list[WeightGroup]], measured: bool,
              target: Budget, activations: int, tuned: bool = False) -> Estimate:
    """Block by block: the body, the largest block twice (weights, rows), its statistics, activations, forms, export.

    Args:
        activations: the calibration tokens times the hidden width (the activations between blocks hold this many
            float32 numbers, and one more batch while a block runs).
        tuned: each block's scales are tuned (:mod:`aecompress.compress.block_tuning`): the original block's outputs
            are held beside its inputs, and the tune holds the block's decoded rows, their factors and gradients.
    """
    base = getattr(model, "base_model", model)
    body = _numbers(base) - _numbers(blocks)
    largest = max(_numbers(b) for b in blocks)
    stats = max((_covariances(mine) for mine in per_block), default=0) if measured else 0
    widest = max((g.rows * g.width for mine in per_block for g in mine), default=0)
    return Estimate("block by block", {
        "body outside the blocks": FLOAT32 * body, "largest block and its rows": 2 * FLOAT32 * largest,
        "its statistics": stats, "activations between blocks": FLOAT32 * activations if measured or tuned else 0,
        "the method's working copies": _working([g for mine in per_block for g in mine]) if measured else 0,
        "the original block's outputs and the block tune": FLOAT32 * (activations + 3 * largest) if tuned else 0,
        "stored forms": _stored([g for mine in per_block for g in mine], target),
        "export (a tensor read, cast and decoded)": 3 * FLOAT32 * widest, "fixed": FIXED})


def choose(ceiling: int | None, forced: bool | None, whole_model: Estimate, by_block: Estimate | None,
           model_tune: Estimate | None = None) -> bool:
    """Whether to go block by block; prints which path and why, or one line naming what does not fit.

    ``model_tune``: what the whole-model tune after block by block holds (``--model_tune_steps``), or None.
    """
    if forced is False or (forced is None and (ceiling is None or whole_model.total <= ceiling)):
        if ceiling is not None and whole_model.total > ceiling:
            raise AECompressError(f"--max_memory {gigabytes(ceiling)} is below the whole model's "
                                  f"{whole_model.describe()}; drop --blockwise false to go block by block")
        if model_tune is not None:
            raise AECompressError(WHOLE_PATH_TUNE)
        why = "" if ceiling is None else f": {whole_model.describe()}, within --max_memory {gigabytes(ceiling)}"
        print(f"compress path: whole model{why}", flush=True)
        return False
    if by_block is None:
        raise AECompressError(f"the whole model needs {whole_model.describe()}, over --max_memory "
                              f"{gigabytes(ceiling or 0)}, and block by block needs a local safetensors checkpoint")
    if ceiling is not None and by_block.total > ceiling:
        raise AECompressError(f"--max_memory {gigabytes(ceiling)} is too small even block by block, which needs "
                              f"{by_block.describe()}; give at least {gigabytes(by_block.total)}, or fewer "
                              "--calibration_tokens")
    if model_tune is not None and ceiling is not None and model_tune.total > ceiling:
        raise AECompressError(f"--model_tune_steps loads the whole model, {model_tune.describe()}, over --max_memory "
                              f"{gigabytes(ceiling)}; give --model_tune_steps 0 (--tune_steps still tunes each block)")
    why = "--blockwise true" if forced else f"the whole model needs {whole_model.describe()}, over --max_memory " \
                                           f"{gigabytes(ceiling or 0)}"
    then = "" if model_tune is None else f"; then the whole-model tune, {model_tune.describe()}"
    print(f"compress path: block by block, {by_block.describe()} ({why}){then}", flush=True)
    return True


@dataclass
class Opened:
    """The model as the chosen path holds it: loaded whole (``files`` None) or a skeleton with its files."""

    model: nn.Module
    source: str
    auto_class: str
    groups: list[WeightGroup]
    files: TensorFiles | None = None


def open_model(name: str, modules: list[str], mode: str, choice: MethodChoice, target: Budget, ceiling: int | None,
               forced: bool | None, tokens: int, trust_remote_code: bool = False, model_tune: dict | None = None,
               window: int = 512) -> Opened:
    """Open the model for the path that fits ``ceiling`` (or the one ``forced``), selecting its groups.

    The skeleton is read first (no weights) whenever there is a ceiling or block by block is asked for, so a
    ceiling that cannot be met is refused before any weight is read. ``model_tune``: the settings of a whole-model
    tune after block by block (``--model_tune_steps``), counted against the ceiling; refused on the whole-model path.
    ``window``: the calibration window, whose length a tune's activations grow with.
    """
    lazy = open_lazy(name, trust_remote_code=trust_remote_code) if ceiling is not None or forced else None
    if lazy is None and model_tune:
        raise AECompressError(WHOLE_PATH_TUNE)
    if lazy is None:
        if forced:
            raise AECompressError(f"--blockwise true reads the model from a local safetensors checkpoint; {name!r} is "
                                  "not one (download it, or save it with save_pretrained)")
        net, source, auto_class = load_model(name, trust_remote_code=trust_remote_code)
        groups = select_groups(net, modules, mode)
        if ceiling is not None:  # not forced: over the ceiling, the line says block by block needs safetensors
            choose(ceiling, forced, _tuned(whole(net, groups, _measured(choice), target), net, choice.tune, window), None)
        return Opened(net, source, auto_class, groups)
    skeleton, files, source, auto_class = lazy
    groups = select_groups(skeleton, modules, mode)
    whole_model = _tuned(whole(skeleton, groups, _measured(choice), target), skeleton, choice.tune, window)
    tune_estimate = _tuned(whole(skeleton, groups, False, target), skeleton, model_tune, window) if model_tune else None
    if forced is False or (forced is None and ceiling is not None and whole_model.total <= ceiling):
        choose(ceiling, forced, whole_model, None, tune_estimate)
        return Opened(load_model(name, trust_remote_code=trust_remote_code)[0], source, auto_class, groups)
    check_blockwise(dataclasses.replace(choice, tune=choice.tune or model_tune or {}))
    reader = BlockReader(skeleton, files)
    width = getattr(skeleton.config, "hidden_size", None) or getattr(skeleton.config, "n_embd", 0)
    by_block = blockwise(skeleton, reader.blocks, block_groups(reader, groups), _measured(choice), target, tokens * width,
                         bool(choice.tune))
    choose(ceiling, forced, whole_model, by_block, tune_estimate)
    return Opened(skeleton, source, auto_class, groups, files)


def _tuned(estimate: Estimate, skeleton: nn.Module, tune: dict | None, window: int) -> Estimate:
    """The estimate with a whole-model tune's activations added, if there is a tune."""
    if tune and tune.get("steps"):
        estimate.parts["the tune's activations"] = tune_activations(skeleton.config, window, tune.get("batch_size", 1))
    return estimate


def _measured(choice: MethodChoice) -> bool:
    return "covariance" in catalogue.get(choice.method).needs
