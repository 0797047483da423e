"""Training an autoencoder recipe (a fit config) inside another command.

The benchmark runs recipes such as ``configs/best.yaml`` on groups and ratios
of its own. The recipe is rewritten with those choices and the run's own
directories, saved beside the run for reproducibility, and then handled by
the very same LightningCLI as ``aecompress fit``, reusing the loaded model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.stored import StoredForm
from aecompress.training.checkpoints import load_weights
from aecompress.training.cli import build_cli
from aecompress.training.datamodule import budget_options, preloaded
from aecompress.training.timing import FitTimer

log = logging.getLogger(__name__)


def _rewrite(recipe: dict, name: str, modules: list[str], mode: str, target: Budget, calibration: str,
             calibration_tokens: int, run_dir: Path) -> dict:
    data = dict(recipe.get("data") or {})
    data.update(model=name, modules=list(modules), mode=mode, **budget_options(target))
    if data.get("calibration"):
        data.update(calibration=calibration, calibration_tokens=calibration_tokens)
    trainer = dict(recipe.get("trainer") or {})
    trainer["default_root_dir"] = str(run_dir)
    logger = trainer.get("logger")
    if isinstance(logger, dict) and "init_args" in logger:
        trainer["logger"] = {**logger, "init_args": {**logger["init_args"], "save_dir": str(run_dir / "logs")}}
    callbacks = []
    for cb in trainer.get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("FitReport"):
            continue  # the benchmark measures every method itself, on its own report split
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
            cb = {**cb, "init_args": {**cb.get("init_args", {}), "dirpath": str(run_dir / "ckpt")}}
        callbacks.append(cb)
    trainer["callbacks"] = callbacks
    return {**recipe, "data": data, "trainer": trainer}


def _override(config: dict, overrides: dict) -> dict:
    """Apply ``{"section.key": value}`` overrides to a recipe."""
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in ("data", "model", "trainer", "seed_everything") or (section != "seed_everything" and not key):
            raise AECompressError(f"recipe override {dotted!r} must be data.KEY, model.KEY or trainer.KEY")
        if section == "seed_everything":
            config[section] = value
        else:
            config[section] = {**(config.get(section) or {}), key: value}
    return config


def train_recipe(
    recipe_path: str, bench, modules: list[str], mode: str, target: Budget, run_dir: Path, overrides: dict | None = None
) -> list[StoredForm]:
    """Fit a recipe on the benchmark's model; return the stored forms of its best checkpoint.

    Args:
        recipe_path: a fit config (YAML).
        bench: the running :class:`aecompress.benchmark.Benchmark` (model, calibration choice).
        modules: module types to compress.
        mode: ``concatenated`` or ``separated``.
        target: the budget.
        run_dir: where this run's config, logs and checkpoints go.
        overrides: dotted recipe keys to replace (``model.storage_dtype``...).
    """
    path = Path(recipe_path)
    if not path.is_file():
        raise AECompressError(f"recipe {recipe_path!r} does not exist")
    recipe = _override(yaml.safe_load(path.read_text()) or {}, overrides or {})
    config = _rewrite(recipe, bench.name, modules, mode, target, bench.calibration.spec, bench.calibration.tokens, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with preloaded(bench.name, bench.model, bench.source, bench.auto_class):
        cli = build_cli(["--config", str(run_dir / "recipe.yaml")], run=False)
    timer = FitTimer()
    cli.trainer.callbacks.insert(0, timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    log.info("%s", timer.summary())
    (run_dir / "fit_seconds.json").write_text(json.dumps(timer.phases(), indent=1))
    best = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
    if best:
        load_weights(cli.model, best)
    return list(cli.model.stored_forms(cli.datamodule.rows).values())
