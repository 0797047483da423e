"""Calibration windows run through one transformer block at a time, keeping only the activations between blocks.

The whole-model pass (:func:`aecompress.data.statistics.covariances`) needs every weight in memory. Here the
body (embeddings, rotary tables, masks) runs once per batch with every block replaced by a pass-through that
records how the model calls it: the hidden states entering the first block, and each block's other arguments
(attention mask, position embeddings and ids; a key-value cache is dropped, the windows are run once). Then each
block in turn runs on the batches' hidden states with its recorded arguments, its linear layers' input moments
are summed (the same :class:`~aecompress.data.statistics.InputMoments`, the same batches, in the same order), and
its outputs become the next block's inputs. With the original weights in every block, each block sees exactly
what it sees in the whole-model pass, so the covariances are bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from aecompress.blocks.base import GroupStats
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.data.statistics import COVARIANCE_BATCH, InputMoments, linear_owners


@dataclass
class Call:
    """How the model calls one block on one batch, apart from the hidden states."""

    args: tuple
    kwargs: dict


def _kept(value):
    """An argument as a block is replayed with it: a key-value cache is dropped (each window runs once)."""
    from transformers.cache_utils import Cache

    return None if isinstance(value, Cache) else value


def _pass_through(*args, **kwargs):
    return args[0]


def first_output(output):
    """A block's hidden states, whether it returns them alone or first in a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def block_calls(body: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                batch_size: int = COVARIANCE_BATCH) -> tuple[list[torch.Tensor], list[list[Call]]]:
    """The hidden states entering the first block, per batch, and every block's recorded calls, per batch.

    Args:
        body: the base model, with real weights outside ``blocks`` (the blocks' own weights are not read).
        blocks: its transformer blocks.
        input_ids: the calibration windows; they are run in batches of ``batch_size`` windows.
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[Call]] = [[] for _ in blocks]

    def recorder(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not args:
                raise AECompressError(f"{type(module).__name__} is called without its hidden states first; block by "
                                      "block needs blocks called as block(hidden_states, ...): compress it whole")
            if index == 0:
                hidden.append(args[0].detach())
            calls[index].append(Call(tuple(_kept(a) for a in args[1:]), {k: _kept(v) for k, v in kwargs.items()}))

        return hook

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    for block in blocks:
        block.forward = _pass_through  # the blocks' weights stay unread: only how they are called is recorded
    was_training = body.training
    body.eval()
    try:
        for batch in input_ids.split(batch_size):
            body(batch)
    finally:
        for handle in handles:
            handle.remove()
        for block in blocks:
            del block.forward
        body.train(was_training)
    return hidden, calls


@torch.no_grad()
def run_block(block: nn.Module, hidden: list[torch.Tensor], calls: list[Call]) -> None:
    """Run one block on every batch, its outputs replacing its inputs in ``hidden`` (one batch of extra memory)."""
    was_training = block.training
    block.eval()
    try:
        for j, call in enumerate(calls):
            hidden[j] = first_output(block(hidden[j], *call.args, **call.kwargs)).detach()
    finally:
        block.train(was_training)


@torch.no_grad()
def block_statistics(model: nn.Module, block: nn.Module, groups: Sequence[WeightGroup], hidden: list[torch.Tensor],
                     calls: list[Call], tokens: int, advance: bool) -> dict[str, GroupStats]:
    """The input covariances of the groups in one block, summed as the whole-model pass sums them.

    Args:
        model: the model the groups' parameter names refer to (its skeleton, with this block's weights).
        block: the block the groups' layers live in.
        hidden: each batch's hidden states entering the block; with ``advance`` they become its outputs.
        calls: the block's recorded calls, one per batch.
        tokens: calibration tokens, as the whole-model statistics record them.
    """
    moments = InputMoments(linear_owners(model, groups))
    inputs = hidden if advance else list(hidden)
    try:
        run_block(block, inputs, calls)
    finally:
        moments.remove()
    params = dict(model.named_parameters())
    means = moments.means(groups)
    return {g.name: GroupStats(tokens=tokens, covariances=means[g.name],
                               member_rows=[m.view(params[m.param]).shape[0] for m in g.members]) for g in groups}
