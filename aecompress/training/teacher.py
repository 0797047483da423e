"""The original model's next-token distributions, kept in bounded memory: top-k log-probabilities and tail mass.

A model-level fit compares the compressed model's next-token distribution with the original's on
every calibration position, every step. Keeping the original's logits costs positions x vocabulary
numbers: with a 262k-token vocabulary that is half a gigabyte per 512-token window in float16, and
it grows with every window. Here each position keeps only its ``k`` most likely tokens' log-probabilities
and the log of the mass left over. The loss is then the KL divergence between the two distributions
coarsened onto those ``k + 1`` outcomes (each of the top ``k`` tokens, and "any other token"), which
never exceeds the full KL, equals it when the tail is empty, and costs ``k`` entries per position
whatever the vocabulary. With ``k`` of 64 the cache is independent of the vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TAIL_FLOOR = 1e-12
"""Smallest tail mass taken as a probability (keeps ``log`` finite when the top k hold all of it)."""


@dataclass(frozen=True)
class TopK:
    """A batch of next-token targets: the top ``k`` token ids, their log-probabilities, and the tail's log-mass."""

    indices: torch.Tensor  # (..., k) int64
    logprobs: torch.Tensor  # (..., k) float32
    tail: torch.Tensor  # (...,) float32: log of 1 - sum(exp(logprobs))

    def to(self, device) -> TopK:
        """The same targets on another device."""
        return TopK(self.indices.to(device), self.logprobs.to(device), self.tail.to(device))

    @property
    def nbytes(self) -> int:
        """What these targets hold in memory."""
        return sum(t.numel() * t.element_size() for t in (self.indices, self.logprobs, self.tail))


def _log_rest(logprobs: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum(exp(logprobs)))`` over the last dimension, floored so it stays finite."""
    head = torch.logsumexp(logprobs, dim=-1).clamp(max=0)
    return torch.log((-torch.expm1(head)).clamp_min(TAIL_FLOOR))


@torch.no_grad()
def top_k_targets(logits: torch.Tensor, k: int) -> TopK:
    """The top ``k`` next-token log-probabilities of each position, and its tail's log-mass.

    Raises:
        ValueError: ``k`` is not a positive integer.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be a positive integer, got {k!r}")
    logprobs = logits.float().log_softmax(-1)
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return TopK(top.indices, top.values, _log_rest(top.values))


def coarse_kl(student_logits: torch.Tensor, targets: TopK) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the ``k + 1`` outcomes the targets keep, in float32.

    The student's probabilities of the teacher's top ``k`` tokens come from its full softmax; its tail
    is the mass it puts anywhere else.
    """
    student = student_logits.float().log_softmax(-1).gather(-1, targets.indices)
    head = (targets.logprobs.exp() * (targets.logprobs - student)).sum(-1)
    tail = targets.tail.exp() * (targets.tail - _log_rest(student))
    return (head + tail).mean()


class Teacher:
    """The original model's outputs for each distinct window batch: computed once, kept in bounded memory.

    Causal and masked LMs keep top-``k`` targets (or, with ``top_k`` None, their whole logits in
    float16); encoders without a head keep their last hidden states in float16. Kept on the CPU.

    Args:
        top_k: next-token targets kept per position; None keeps the whole distribution.
        keep: keep the outputs between epochs (else recompute them every step).
    """

    def __init__(self, top_k: int | None = 64, keep: bool = True):
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or null, got {top_k!r}")
        self.top_k, self.keep = top_k, keep
        self._kept: dict[bytes, TopK | torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of every output kept."""
        return sum(t.nbytes if isinstance(t, TopK) else t.numel() * t.element_size() for t in self._kept.values())

    @torch.no_grad()
    def targets(self, model, ids: torch.Tensor) -> TopK | torch.Tensor:
        """The original model's targets for ``ids``, on the device of ``ids``."""
        key = ids.cpu().numpy().tobytes()
        found = self._kept.get(key)
        if found is None:
            found = self._made(model(input_ids=ids))
            if self.keep:
                self._kept[key] = found.to("cpu")
        return found.to(ids.device)

    def _made(self, out) -> TopK | torch.Tensor:
        logits = getattr(out, "logits", None)
        if logits is None:
            return out.last_hidden_state.to(torch.float16)
        return logits.to(torch.float16) if self.top_k is None else top_k_targets(logits, self.top_k)

    @staticmethod
    def mismatch(student, targets: TopK | torch.Tensor) -> torch.Tensor:
        """How far the student's outputs are from the targets: next-token KL, or relative squared error of
        the last hidden states for an encoder."""
        if isinstance(targets, TopK):
            return coarse_kl(student.logits, targets)
        if getattr(student, "logits", None) is not None:
            teacher = targets.float().log_softmax(-1)
            return (teacher.exp() * (teacher - student.logits.float().log_softmax(-1))).sum(-1).mean()
        target = targets.float()
        return (student.last_hidden_state.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)
