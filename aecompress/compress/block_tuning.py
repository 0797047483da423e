"""The scale tune of one transformer block: its compressed output against the original block's, on calibration text.

Block by block (:mod:`aecompress.compress.blockwise`) never holds the whole model, so the whole-model tune
(:mod:`aecompress.compress.tuning`) cannot run there. What it can hold is one block, the activations entering
it, and what the original block made of them. So each block's tunable forms learn one factor per stored scale
(the same factor the whole-model tune learns, folded into the scale the same way: same tensors, same bytes)
so that the block's output matches the original block's, relative squared error summed over the calibration
batches. The objective is measured on every batch before and after; a tune that made it worse is dropped.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from aecompress.compress.tuning import factors, folded, recorded, scaled, tunable
from aecompress.core.groups import substituted_params
from aecompress.core.stored import StoredForm
from aecompress.data.blockwise import Call, first_output

log = logging.getLogger(__name__)

BLOCK_TUNE = "block_tune"
"""The meta key each tuned form records the block tune's outcome under."""


class BlockStudent:
    """One block run with its groups' decoded rows scaled by learned factors (the block itself untouched)."""

    def __init__(self, model: nn.Module, block: nn.Module, prefix: str, forms: list[StoredForm]):
        self.model, self.block, self.prefix = model, block, prefix
        self.forms = [f for f in forms if tunable(f)]
        parts = [factors(f) for f in self.forms]
        self.bases = [base for base, _ in parts]
        self.logs = [log_factor.requires_grad_(True) for _, log_factor in parts]

    def output(self, hidden: torch.Tensor, call: Call) -> torch.Tensor:
        """The block's output on one batch with the current factors, differentiable in them."""
        decoded = {f.group: scaled(f, base, lf) for f, base, lf in zip(self.forms, self.bases, self.logs)}
        params = {k.removeprefix(self.prefix): v for k, v in substituted_params(self.model, decoded).items()}
        out = torch.func.functional_call(self.block, params, (hidden, *call.args), call.kwargs)
        return first_output(out)

    def error(self, inputs: list[torch.Tensor], targets: list[torch.Tensor], calls: list[Call], j: int) -> torch.Tensor:
        """Relative squared error of batch ``j``'s output against the original block's."""
        target = targets[j]
        return (self.output(inputs[j], calls[j]) - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)

    @torch.no_grad()
    def objective(self, inputs, targets, calls) -> float:
        """The mean relative error over every batch."""
        return sum(float(self.error(inputs, targets, calls, j)) for j in range(len(calls))) / max(len(calls), 1)


def tune_block(model: nn.Module, block: nn.Module, prefix: str, forms: list[StoredForm], inputs: list[torch.Tensor],
               targets: list[torch.Tensor], calls: list[Call], steps: int, lr: float, seed: int = 0) -> list[StoredForm]:
    """The block's forms with their scales tuned for ``steps`` steps (one calibration batch each), or as they were.

    Args:
        model: the model the forms' parameter names refer to (its skeleton, with this block's weights).
        block: the block, with its original weights; never written to.
        prefix: the block's parameter-name prefix in ``model`` (``model.layers.3.``).
        forms: the stored forms of the block's groups.
        inputs: each batch's hidden states entering the block.
        targets: the original block's outputs on ``inputs``.
        calls: the block's recorded calls, one per batch.
        steps: optimizer steps; 0 returns the forms untouched.
        lr: Adam's learning rate on the log-factors.
    """
    student = BlockStudent(model, block, prefix, forms)
    if steps <= 0 or not student.forms or not calls:
        return list(forms)
    flags = {n: p.requires_grad for n, p in block.named_parameters()}
    block.requires_grad_(False)
    try:
        before = student.objective(inputs, targets, calls)
        optimizer = torch.optim.Adam(student.logs, lr=lr)
        order = torch.randperm(len(calls) * (steps // len(calls) + 1), generator=torch.Generator().manual_seed(seed))
        for step in range(steps):
            optimizer.zero_grad()
            student.error(inputs, targets, calls, int(order[step]) % len(calls)).backward()
            optimizer.step()
        after = student.objective(inputs, targets, calls)
    finally:
        for name, param in block.named_parameters():
            param.requires_grad_(flags[name])
    record = {"kept": after <= before, "steps": steps, "lr": lr, "objective_before": before, "objective_after": after}
    log.info("block %s: output error %.4g -> %.4g after %d steps", prefix, before, after, steps)
    if not record["kept"]:  # worse, or not finite
        log.warning("the block tune of %s made its output error worse (%.4g -> %.4g); kept the untuned forms",
                    prefix, before, after)
        return [recorded(f, record, BLOCK_TUNE) for f in forms]
    learned = dict(zip((f.group.name for f in student.forms), student.logs))
    return [recorded(folded(f, learned[f.group.name], steps), record, BLOCK_TUNE) if f.group.name in learned else f
            for f in forms]

