"""Compressing a model one transformer block at a time, for models bigger than the machine.

The whole-model path (:func:`aecompress.compress.pipeline.closed_form`) holds the float32 model, every group's
statistics and rows at once. Here the model is its skeleton (meta device) and its safetensors files: the calibration
windows run through the body once to record the first block's inputs, then each block in turn is read, its groups'
input covariances summed (:mod:`aecompress.data.blockwise`), its groups compressed, its outputs kept as the next
block's inputs, and its weights dropped. Memory holds one block, its statistics, the activations between blocks and
the stored forms made so far. The embeddings and head are not compressed, as on the whole-model path.

With the original's activations as each block's input (the default), the stored forms are bit-identical to the
whole-model path's for the same groups. ``sequential`` instead feeds each block the outputs of the blocks before it
already compressed (as GPTQ does), so each block's statistics describe the inputs it will see after compression.
"""

from __future__ import annotations

import aecompress.methods as catalogue
from aecompress.compress.block_tuning import tune_block
from aecompress.compress.choices import MethodChoice
from aecompress.compress.tuning import spread
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup, assign_rows, extract_rows
from aecompress.core.progress import progress
from aecompress.core.stored import StoredForm
from aecompress.data import blockwise
from aecompress.data.calibration import Calibration
from aecompress.formats.blocks import BlockReader
from aecompress.formats.lazy import TensorFiles


def _layers(reader: BlockReader, group: WeightGroup) -> list[int | None]:
    """The block each member lives in (None: outside every block)."""
    prefix = reader.name + "."
    out = []
    for member in group.members:
        rest = member.param.removeprefix(prefix)
        head = rest.split(".", 1)[0]
        out.append(int(head) if member.param.startswith(prefix) and head.isdigit() else None)
    return out


def block_groups(reader: BlockReader, groups: list[WeightGroup]) -> list[list[WeightGroup]]:
    """The groups of each block, in order; one clear line for a group that is not inside exactly one block."""
    per_block: list[list[WeightGroup]] = [[] for _ in reader.blocks]
    for group in groups:
        layers = set(_layers(reader, group))
        if None in layers:
            outside = next(m.param for m, i in zip(group.members, _layers(reader, group)) if i is None)
            raise AECompressError(f"group {group.name!r} holds {outside!r}, outside the blocks of {reader.name!r}; "
                                  "block by block compresses weights inside transformer blocks only")
        if len(layers) > 1:
            raise AECompressError(
                f"group {group.name!r} spans blocks {min(layers)}..{max(layers)}; block by block compresses one block "
                "at a time, so each group must hold weights of one block: give --mode separated (one group per matrix)")
        per_block[layers.pop()].append(group)
    return per_block


def check_blockwise(choice: MethodChoice) -> None:
    """One clear line for what block by block cannot do: a tune on several processes, a measured allocation, Fisher
    weights."""
    several = spread(choice.tune)
    if several:
        key, value = several
        raise AECompressError(f"block by block tunes each block in this one process; --{key} {value} applies to the "
                              f"whole-model tune: give --{key} 1")
    if choice.allocation != "uniform":
        raise AECompressError(f"block by block shares the budget uniformly; --allocation {choice.allocation!r} "
                              "measures the whole model: give --allocation uniform")
    needs = set(catalogue.get(choice.method).needs) - {"covariance"}
    if needs:
        raise AECompressError(f"method {choice.method!r} needs {', '.join(sorted(needs))} (gradients of the whole "
                              "model); block by block gives input covariances only: use compensated, quantize, svd "
                              "or whitened_svd")


def compress_blockwise(model, files: TensorFiles, calibration: Calibration, choice: MethodChoice,
                       groups: list[WeightGroup], target: Budget, sequential: bool = False) -> list[StoredForm]:
    """The stored forms of ``groups``, compressed one block at a time, in the order of ``groups``.

    Args:
        model: the model's skeleton (meta device); each block is given its weights while it is worked on.
        files: the checkpoint's safetensors files.
        calibration: the calibration windows (its statistics are not used: they are summed here, block by block).
        choice: the method, options and (uniform) allocation; its tune, if any, runs per block
            (:mod:`aecompress.compress.block_tuning`): ``steps`` steps of each block, one calibration batch a step.
        groups: the groups, each inside one block.
        target: every group's budget.
        sequential: feed each block the outputs of the compressed blocks before it, not the original's.
    """
    check_blockwise(choice)
    reader = BlockReader(model, files)
    per_block = block_groups(reader, groups)
    last = max((i for i, mine in enumerate(per_block) if mine), default=-1)
    measured = "covariance" in catalogue.get(choice.method).needs
    steps = choice.tune.get("steps", 0) if choice.tune else 0
    # The statistics and the tune need every block's inputs (and the tune the original's outputs).
    hidden, calls = (blockwise.block_calls(reader.body(), reader.blocks, calibration.windows()) if measured or steps
                     else ([], []))
    tokens = calibration.windows().numel()
    forms: dict[str, StoredForm] = {}
    for index in progress(range(last + 1), "compress by block", "block"):
        block, mine = reader.load(index), per_block[index]
        # With the tune, the original block's outputs are kept apart from its inputs: they are its targets.
        outputs = list(hidden) if steps else hidden
        stats = blockwise.block_statistics(model, block, mine, outputs, calls[index], tokens,
                                           advance=bool(steps) or not sequential) if measured else {}
        if steps and not measured:
            blockwise.run_block(block, outputs, calls[index])
        for group in mine:
            forms[group.name] = catalogue.compress(choice.method, group, extract_rows(model, group), target,
                                                   stats.get(group.name), **choice.options)
        if steps:
            tuned = tune_block(model, block, reader.block_prefix(index), [forms[g.name] for g in mine], hidden,
                               outputs, calls[index], steps, choice.tune.get("lr", 1e-3))
            forms.update({f.group.name: f for f in tuned})
            if not sequential:
                hidden[:] = outputs
        if (measured or steps) and sequential:
            for group in mine:
                assign_rows(model, group, catalogue.decode(forms[group.name]))
            blockwise.run_block(block, hidden, calls[index])
        reader.release(index)
    return [forms[g.name] for g in groups]
