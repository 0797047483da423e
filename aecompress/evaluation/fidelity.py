"""Fidelity of a causal LM to its original: KL divergence of next-token distributions and top-1 agreement.

A compressed model can score a lower perplexity than its original by drifting; these measure
how far it moved. The original's distribution at every scored token is kept as its top ``k``
log-probabilities and the log of the mass left over (:class:`TeacherTargets`), so the original
runs once and the targets stay small whatever the vocabulary (a token costs ``k`` floats and
indices instead of a vocabulary's worth).

``kl_to_original`` is ``KL(original || compressed)`` over the original's top ``k`` tokens and
one bucket holding the rest of the vocabulary: by the log-sum inequality it never exceeds the
full KL, and it equals it but for the tail's own share, which is tiny once ``k`` covers most
of the mass (``k = 128`` by default). ``top1_agreement`` is the share of tokens where both
models' most likely next token is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aecompress.core.errors import AECompressError

TOP_K = 128
"""Tokens of the original's distribution kept exactly per position; the rest is one bucket."""


@dataclass
class TeacherTargets:
    """The original's next-token distributions at every scored token, in stream order.

    Attributes:
        logp: ``(tokens, k)`` float32 log-probabilities of the original's top ``k`` tokens, largest first.
        index: ``(tokens, k)`` int64 token ids of those.
        tail: ``(tokens,)`` float64 log of the probability left outside them.
        window: the window the targets were scored with.
        stride: the stride between windows.
    """

    logp: torch.Tensor
    index: torch.Tensor
    tail: torch.Tensor
    window: int
    stride: int

    @property
    def tokens(self) -> int:
        """How many scored tokens the targets cover."""
        return self.logp.shape[0]

    @staticmethod
    def of(logits: torch.Tensor, k: int = TOP_K) -> TeacherTargets:
        """Targets from ``(n, vocab)`` logits (window and stride are set by the caller)."""
        logp = logits.float().log_softmax(-1)
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        kept = top.values.double().exp().sum(-1)
        tail = torch.log((1 - kept).clamp_min(0))
        return TeacherTargets(top.values.cpu(), top.indices.cpu(), tail.cpu(), 0, 0)

    def part(self, start: int, count: int) -> TeacherTargets:
        """The targets of ``count`` scored tokens from ``start``."""
        return TeacherTargets(self.logp[start : start + count], self.index[start : start + count],
                              self.tail[start : start + count], self.window, self.stride)

    @staticmethod
    def joined(parts: list[TeacherTargets], window: int, stride: int) -> TeacherTargets:
        """One stream's targets from its batches' targets."""
        return TeacherTargets(torch.cat([p.logp for p in parts]), torch.cat([p.index for p in parts]),
                              torch.cat([p.tail for p in parts]), window, stride)


def compare(logits: torch.Tensor, targets: TeacherTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(original || model), float64, and top-1 agreement (1.0 / 0.0) against the targets.

    Args:
        logits: ``(n, vocab)`` logits of the model at the same scored tokens as ``targets``.
        targets: the original's targets for those tokens.
    """
    if logits.shape[0] != targets.tokens:
        raise AECompressError(f"{logits.shape[0]} scored tokens against {targets.tokens} targets; "
                              "the original and the model must be measured on the same windows")
    logq = logits.float().log_softmax(-1)
    index = targets.index.to(logq.device)
    logq_top = logq.gather(-1, index).double().cpu()
    logp_top = targets.logp.double()
    p_top = logp_top.exp()
    q_tail = torch.log((1 - logq_top.exp().sum(-1)).clamp_min(torch.finfo(torch.float64).tiny))
    p_tail = targets.tail.exp()
    tail_term = torch.where(p_tail > 0, p_tail * (targets.tail - q_tail), torch.zeros_like(p_tail))
    kl = (p_top * (logp_top - logq_top)).sum(-1) + tail_term
    agree = (logq.argmax(-1).cpu() == targets.index[:, 0]).double()
    return kl.clamp_min(0), agree
