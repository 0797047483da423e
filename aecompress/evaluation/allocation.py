"""Spending a whole-model budget where it matters: bytes per group by measured sensitivity per byte.

Uniform allocation gives every group the same bits per weight. The measured allocator first
compresses each group alone at a few sizes around the target (with the method itself, or the
factorization an autoencoder starts from), measures how much the model's outputs move on
calibration text (KL to the original for causal LMs, one minus embedding fidelity for
encoders), and then picks one size per group so that the summed damage is least while the
stored bytes, counted by the one accountant, stay within the same total as uniform's. The
choice is a multiple-choice knapsack, solved by a Lagrange multiplier on bytes (each group
picks what minimises damage + λ·bytes; λ is bisected to the budget), then filled greedily
with what is left. If the additive estimate says uniform is better, uniform is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

from aecompress.core.budget import BITS_PER_ORIGINAL, Budget, bits_per_weight
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.progress import progress
from aecompress.core.stored import StoredForm
from aecompress.data.tokens import token_ids
from aecompress.evaluation.metrics import evaluate_model, targets_for
from aecompress.evaluation.sentences import fidelity_reference
from aecompress.formats.sources import model_kind
from aecompress.formats.substitute import decode_all, substituted

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "measured")
"""How a budget can be shared by groups: every group the same bits per weight, or by measured sensitivity."""
SCALES = (0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0)
"""Sizes tried per group, as multiples of the target bits per weight."""


@dataclass(frozen=True)
class Choice:
    """One group's size in a plan."""

    group: str
    bits: float
    ratio: float
    stored_bytes: int
    damage: float


@dataclass
class Plan:
    """Bytes, ratio and bits per group, with the measured damage each was chosen by."""

    target_bits: float
    kind: str
    choices: list[Choice]

    @property
    def stored_bytes(self) -> int:
        return sum(c.stored_bytes for c in self.choices)

    def budgets(self) -> dict[str, Budget]:
        """Group name -> the budget this plan gives it."""
        return {c.group: Budget.of_bits(c.bits) for c in self.choices}

    def to_dict(self) -> dict:
        return {"target_bits": self.target_bits, "kind": self.kind, "choices": [asdict(c) for c in self.choices]}

    def table(self, groups: list[WeightGroup]) -> str:
        """The plan as a text table, printed before anything trains."""
        numbers = {g.name: g.rows * g.width for g in groups}
        total = sum(numbers.values())
        lines = [f"allocation plan ({self.kind}) at {self.target_bits:g} bits per weight:",
                 f"  {'group':<24} {'bits/weight':>11} {'ratio':>8} {'stored bytes':>13} {'damage':>10}"]
        lines += [f"  {c.group:<24} {c.bits:>11.3f} {c.ratio:>8.3f} {c.stored_bytes:>13,} {c.damage:>10.4g}"
                  for c in self.choices]
        lines.append(f"  {'all':<24} {bits_per_weight(self.stored_bytes, total):>11.3f} {'':>8} {self.stored_bytes:>13,}"
                     f" {sum(c.damage for c in self.choices):>10.4g}")
        return "\n".join(lines)


Compressor = Callable[[WeightGroup, float], StoredForm]
Curves = dict[str, list[tuple[float, int, float]]]


def sensitivities(model, groups: list[WeightGroup], rows: dict[str, object], compress_at: Compressor,
                  damage: Callable[[], float], bits: float) -> Curves:
    """For each group alone, at each size: ``(bits, stored bytes, damage)``; sizes it cannot reach are skipped."""
    curves: dict[str, list[tuple[float, int, float]]] = {}
    jobs = [(g, s * bits) for g in groups for s in SCALES if s * bits < BITS_PER_ORIGINAL]
    for group, level in progress(jobs, "allocation", "size"):
        try:
            form = compress_at(group, Budget.of_bits(level))
        except AECompressError:
            continue
        with substituted(model, decode_all([form]), originals={group.name: rows[group.name]}):
            curves.setdefault(group.name, []).append((level, form.bytes, damage()))
    return curves


def solve(curves: Curves, budget: int, target: float) -> dict[str, tuple[float, int, float]]:
    """One size per group, least summed damage within ``budget`` bytes (uniform if the estimate prefers it)."""
    uniform = {g: next((p for p in c if abs(p[0] - target) < 1e-9), None) for g, c in curves.items()}
    if any(p is None for p in uniform.values()):
        raise AECompressError("the allocator could not measure every group at the target size itself")

    def pick(lam: float) -> dict[str, tuple[float, int, float]]:
        return {g: min(c, key=lambda p: (p[2] + lam * p[1], p[1])) for g, c in curves.items()}

    def spent(chosen) -> int:
        return sum(p[1] for p in chosen.values())

    low, high = 0.0, 1.0
    while spent(pick(high)) > budget and high < 1e12:
        high *= 4
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if spent(pick(mid)) > budget else (low, mid)
    chosen = pick(high)
    improved = True
    while improved:  # spend what is left on the upgrade that lowers damage most per byte
        improved = False
        options = [((p[2] - chosen[g][2]) / (p[1] - chosen[g][1]), g, p) for g, c in curves.items() for p in c
                   if p[1] > chosen[g][1] and p[2] < chosen[g][2] and spent(chosen) - chosen[g][1] + p[1] <= budget]
        if options:
            _, g, p = min(options)
            chosen[g] = p
            improved = True
    if sum(p[2] for p in chosen.values()) >= sum(p[2] for p in uniform.values()):
        return uniform
    return chosen


def plan(model, groups: list[WeightGroup], rows: dict[str, object], compress_at: Compressor,
         damage: Callable[[], float], target: Budget, kind: str = "measured") -> Plan:
    """The allocation of ``target`` over ``groups``: ``uniform``, or ``measured`` by sensitivity per byte.

    Args:
        model: the model, compressed one group at a time while measuring (restored after each).
        groups: the groups sharing the budget.
        rows: each group's original rows (to restore).
        compress_at: ``(group, budget) -> stored form``: the method, or the factorization an autoencoder starts from.
        damage: how far the model's outputs are from the original's now (lower is better).
        target: the budget; the total is what uniform allocation stores.
        kind: ``uniform`` or ``measured``.
    """
    if kind not in ALLOCATIONS:
        raise AECompressError(f"unknown allocation {kind!r}; valid: {', '.join(ALLOCATIONS)}")
    bits = float(target.bits)
    if kind == "uniform":
        forms = {g.name: compress_at(g, target) for g in groups}
        return Plan(bits, kind, [Choice(g.name, bits, target.ratio, forms[g.name].bytes, float("nan"))
                                 for g in groups])
    curves = sensitivities(model, groups, rows, compress_at, damage, bits)
    budget = sum(p[1] for c in curves.values() for p in c if abs(p[0] - bits) < 1e-9)
    chosen = solve(curves, budget, bits)
    return Plan(bits, kind, [Choice(g.name, chosen[g.name][0], BITS_PER_ORIGINAL / chosen[g.name][0],
                                    chosen[g.name][1], chosen[g.name][2]) for g in groups])


def damage_on(model, tokenizer, data: str, tokens: int = 2048) -> Callable[[], float]:
    """How far the model's outputs now are from what they are at this call, on the first ``tokens`` of ``data``.

    Causal LMs: mean KL to the original's next-token distributions; other models: one minus the
    embedding fidelity. The original is measured once, here.
    """
    if model_kind(model) == "causal_lm":
        ids = token_ids(data, tokenizer)[:tokens]
        targets = targets_for(model, ids)
        return lambda: evaluate_model(model, tokenizer, data, ["kl_to_original"], targets, ids=ids)["kl_to_original"]
    reference = fidelity_reference(model, tokenizer, data, tokens)
    return lambda: 1 - evaluate_model(model, tokenizer, data, ["embedding_fidelity"], reference,
                                      max_tokens=tokens)["embedding_fidelity"]
