"""A Lightning progress display that a job log can read: :class:`~aecompress.core.progress.Progress` per run.

Lightning's own bar redraws one terminal line, so a fit or tune whose output goes to a file leaves
one line for the whole run. :class:`ProgressLines` shows training and validation through the
package's one :class:`~aecompress.core.progress.Progress`: a bar on a terminal, and plain lines
with the step, the time taken and an estimate of the time left in a log. Use it with
``enable_progress_bar=False`` (it is not a Lightning progress bar, so the two would both draw).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from aecompress.core.progress import Progress


def _total(value) -> int | None:
    """Lightning's step counts are ``inf`` or ``-1`` when unknown."""
    return int(value) if isinstance(value, int | float) and 0 < value < float("inf") else None


class ProgressLines(Callback):
    """Training steps (to ``max_steps``, or the epochs' batches) and each validation's batches, with an ETA.

    Args:
        desc: the name the lines start with (``tune``, ``fit``).
        show_loss: the name of a logged metric to append to each line (e.g. ``tune/loss``).
    """

    def __init__(self, desc: str = "fit", show_loss: str | None = None):
        self.desc, self.show_loss = desc, show_loss
        self.train: Progress | None = None
        self.check: Progress | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Steps are counted to ``max_steps`` when set, else to the epochs' batches."""
        total = _total(trainer.max_steps) or (_total(trainer.num_training_batches) or 0) * (_total(trainer.max_epochs) or 0)
        self.train = Progress(total or None, self.desc, "step", show=trainer.is_global_zero)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """One step more; the latest loss, if logged, ends the line."""
        if self.train is None:
            return
        value = trainer.callback_metrics.get(self.show_loss) if self.show_loss else None
        self.train.update(1, f"loss {float(value):.4g}" if value is not None else "")

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        """The training's last line (if it said anything)."""
        if self.train is not None:
            self.train.close()
            self.train = None

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        """Each validation run counts its own batches."""
        total = sum(_total(n) or 0 for n in trainer.num_val_batches) if trainer.num_val_batches else None
        self.check = Progress(total or None, f"{self.desc} (validation)", "batch", show=trainer.is_global_zero)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        """One batch more."""
        if self.check is not None:
            self.check.update()

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        """The measurement's last line (if it said anything)."""
        if self.check is not None:
            self.check.close()
            self.check = None
