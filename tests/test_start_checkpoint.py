"""A run that starts from a factorization can never be selected worse than that start.

The validation values are scripted (:mod:`tests.scripted`): on a tiny random model a wrecked
step can measure better than the start by chance, so the cases are built by design.
"""

import math
from pathlib import Path

import pytest
import torch
import yaml

from aecompress.cli import main
from tests.test_shipped_recipes import CONFIGS, _local

SCRIPTED = "tests.scripted.ScriptedQuality"


def _fit(tiny_lm, tmp_path: Path, at_start: bool | None, significance: float | None = None, **script) -> dict:
    """best.yaml for two epochs of two steps, its validation values scripted; the best checkpoint."""
    recipe = yaml.safe_load((CONFIGS / "best.yaml").read_text())
    config = _local(recipe, tiny_lm["model"], f"{tiny_lm['text']}:all", tmp_path)
    config["trainer"].update(max_epochs=2, limit_train_batches=2)
    if significance is None:
        config["model"]["refine_codes"] = True  # auto decides by the significance these runs go without
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelQualityCallback"):
            cb["class_path"] = SCRIPTED
            cb["init_args"].update(at_start=at_start, significance=significance, **script)
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["monitor"] = "val/perplexity" if significance is None else "val/perplexity_significant"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    return torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True, map_location="cpu")


def _column(tmp_path: Path, name: str) -> list[float]:
    lines = next((tmp_path / "logs").rglob("metrics.csv")).read_text().splitlines()
    column = lines[0].split(",").index(name)
    return [float(line.split(",")[column]) for line in lines[1:] if line.split(",")[column]]


def test_a_start_better_than_every_trained_epoch_is_the_selected_checkpoint(tiny_lm, tmp_path, cache):
    best = _fit(tiny_lm, tmp_path, at_start=None, start=1.0, trained=[2.0, 1.5])
    assert best["global_step"] == 0
    assert _column(tmp_path, "val/perplexity") == pytest.approx([math.e, math.e**2, math.e**1.5])


def test_a_trained_epoch_better_than_the_start_replaces_it(tiny_lm, tmp_path, cache):
    best = _fit(tiny_lm, tmp_path, at_start=None, start=2.0, trained=[3.0, 1.0])
    assert best["global_step"] == 4  # the second epoch's last step


def test_without_the_start_measurement_a_trained_epoch_is_selected(tiny_lm, tmp_path, cache):
    best = _fit(tiny_lm, tmp_path, at_start=False, start=1.0, trained=[2.0, 1.5])
    assert best["global_step"] == 4  # the better of the two trained epochs; the start was never offered


def test_a_trained_epoch_that_looks_better_replaces_the_start_only_if_the_gain_is_significant(tiny_lm, tmp_path, cache):
    # Trained epochs 0.01 nats better on average, under per-token noise of 1 nat: a few standard errors at most.
    script = dict(start=2.0, trained=[1.99, 1.995], spread=1.0)
    plain = _fit(tiny_lm, tmp_path / "plain", at_start=None, **script)
    measured = _column(tmp_path / "plain", "val/perplexity")
    assert plain["global_step"] > 0
    guarded = _fit(tiny_lm, tmp_path / "guarded", at_start=None, significance=1e6, **script)
    assert guarded["global_step"] == 0
    assert _column(tmp_path / "guarded", "val/perplexity") == measured  # the guard changes selection, not training
    assert _column(tmp_path / "guarded", "val/perplexity_significant") == [measured[0]] * len(measured)
    z = _column(tmp_path / "guarded", "val/perplexity_z")
    assert [v > 0 for v in z] == [v < measured[0] for v in measured[1:]]  # z's sign is the gain's
    # A guard any gain passes selects as plain selection does.
    loose = _fit(tiny_lm, tmp_path / "loose", at_start=None, significance=1e-9, **script)
    assert loose["global_step"] == plain["global_step"]


def test_a_guard_without_the_start_measurement_is_refused(tiny_lm, tmp_path, cache, capsys):
    with pytest.raises(SystemExit):
        _fit(tiny_lm, tmp_path, at_start=False, significance=2.0)
    assert "the start is not measured" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()
