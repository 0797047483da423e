"""A validation measurement the test writes, so selection tests assert the mechanism, not a numeric accident.

On a tiny random model, real validation values barely move with training (a wrecked step can measure
better than the start), so a test that needs "the start is better than every trained step" must
construct that case. :class:`ScriptedQuality` is the real :class:`ModelQualityCallback` (the same
start measurement, broadcasting, logging, guarding and step-0 checkpoint) with only its measurement
replaced: per-token NLLs around levels the test chooses.
"""

from __future__ import annotations

import math

import torch

from aecompress.training.callbacks import ModelQualityCallback

TOKENS = 256


class ScriptedQuality(ModelQualityCallback):
    """``ModelQualityCallback`` whose per-token NLLs are ``level + spread * noise``, levels set by the test.

    Args:
        start: the NLL level of every measurement before the first step.
        trained: the levels of the measurements after training steps, in order (the last repeats).
        refined: the level at the start when a group's latent is wider than its full rank
            (``refine_codes``' refined start); default: ``start``.
        spread: the size of the per-token noise, a fixed draw per training step, so the paired z of two
            steps is finite (two measurements at one step differ by a constant: z is infinite).
        **kwargs: the real callback's arguments.
    """

    def __init__(self, start: float = 1.0, trained: list[float] | None = None, refined: float | None = None,
                 spread: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.start_level, self.trained, self.refined, self.spread = start, list(trained or [start]), refined, spread
        self.after_start = 0

    def measure(self, trainer, pl_module, items=None) -> dict[str, float]:
        """The scripted per-token NLLs in place of a real measurement."""
        if trainer.global_step == 0:
            level = self.refined if self.refined is not None and _refined(pl_module) else self.start_level
        else:
            level = self.trained[min(self.after_start, len(self.trained) - 1)]
            self.after_start += 1
        noise = torch.randn(TOKENS, generator=torch.Generator().manual_seed(trainer.global_step), dtype=torch.float64)
        nll = level + self.spread * noise
        if items is not None:
            items["perplexity"] = nll
        return {"perplexity": math.exp(float(nll.mean()))}


def _refined(pl_module) -> bool:
    """Whether any group's latent is past its full rank (a refined start)."""
    return any(pl_module.specs[g.name].latent > min(g.rows, g.width) for g in pl_module.groups)
