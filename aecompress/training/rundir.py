"""A fit's own directory, and the resolved config saved there (never over a file the user wrote).

The run directory is where the best checkpoint goes (the ``ModelCheckpoint`` directory), else
the logger's directory, else ``<default_root_dir>/aecompress_run``. It holds the checkpoints,
the resolved ``config.yaml`` and the fit's ``report.json``; nothing of the user's is
written over: a ``config.yaml`` there that aecompress did not write is left alone, and so is
any file given with ``--config``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback

log = logging.getLogger(__name__)

MARK = "# The resolved config of this run, written by aecompress fit; the checkpoints here were trained with it.\n"


def run_directory(trainer: L.Trainer) -> Path:
    """Where this fit's checkpoints, resolved config and report live."""
    checkpoint = trainer.checkpoint_callback
    dirpath = getattr(checkpoint, "dirpath", None)
    if dirpath:
        return Path(dirpath)
    if trainer.logger is not None and trainer.log_dir:
        return Path(trainer.log_dir)
    return Path(trainer.default_root_dir) / "aecompress_run"


def _user_configs(config) -> set[Path]:
    given = config.get("config") if hasattr(config, "get") else None
    return {Path(str(p)).resolve() for p in (given or [])}


class RunConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run directory, only over a file it wrote itself."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Nothing yet: a run refused before its first step leaves no directory behind."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save once training starts, after every check that could refuse the run."""
        if self.already_saved:
            return
        if trainer.is_global_zero:
            self._save(run_directory(trainer) / self.config_filename)
        self.already_saved = trainer.strategy.broadcast(True)

    def _save(self, path: Path) -> None:
        ours = path.is_file() and path.read_text(errors="replace").startswith(MARK)
        if path.resolve() in _user_configs(self.config) or (path.exists() and not ours):
            log.warning("%s is not aecompress's; the resolved config was not saved over it", path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.parser.dump(self.config, skip_none=False)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(MARK + text)
        tmp.replace(path)
