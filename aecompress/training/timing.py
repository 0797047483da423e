"""Where a fit's wall time goes: setup, training steps, validation.

Fitting time is one of the three things users judge us on, and the levers
differ by phase: calibration statistics are cached on disk (setup), steps
scale with ``max_steps`` and the window size (training), and model-level
validation scales with ``check_val_every_n_epoch`` and the callback's
``max_tokens`` (validation). ``aecompress fit`` adds this callback and prints
its summary, so a slow run says which knob to turn.
"""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import Callback


class FitTimer(Callback):
    """Wall seconds of a ``fit`` by phase.

    ``setup`` runs from the timer's creation (just before ``trainer.fit``) to the first
    training hook: the data module's and module's setup (calibration covariances,
    factorization inits). ``validation`` sums every validation loop, sanity check and
    model-level callbacks included, plus any callback's ``start_seconds`` (a measurement
    of the starting point before the first step). ``training`` is the rest of the fit.
    """

    def __init__(self) -> None:
        self.created = time.perf_counter()
        self.started: float | None = None
        self.ended: float | None = None
        self.validation = 0.0
        self._validation_start: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validation_start is not None:
            self.validation += time.perf_counter() - self._validation_start
            self._validation_start = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ended = time.perf_counter()
        # Model-level measurements taken outside a validation loop (the start point) are validation too.
        self.validation += sum(float(getattr(c, "start_seconds", 0.0)) for c in trainer.callbacks)

    def phases(self) -> dict[str, float]:
        """Seconds per phase (``setup``, ``training``, ``validation``, ``total``)."""
        end = self.ended if self.ended is not None else time.perf_counter()
        start = self.started if self.started is not None else end
        setup = start - self.created
        return {"setup": setup, "training": max(end - start - self.validation, 0.0),
                "validation": self.validation, "total": end - self.created}

    def summary(self) -> str:
        """One line: total and the share of each phase."""
        p = self.phases()
        share = {k: (100 * v / p["total"] if p["total"] > 0 else 0.0) for k, v in p.items()}
        return (f"fit took {p['total']:.1f} s: setup {p['setup']:.1f} s ({share['setup']:.0f} %), "
                f"training {p['training']:.1f} s ({share['training']:.0f} %), "
                f"validation {p['validation']:.1f} s ({share['validation']:.0f} %)")
