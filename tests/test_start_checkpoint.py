"""A run that starts from a factorization can never be selected worse than that start."""

from pathlib import Path

import pytest
import torch
import yaml

from aecompress.cli import main
from tests.test_shipped_recipes import CONFIGS, _local


def _fit(tiny_lm, tmp_path: Path, lr: float, at_start: bool | None, significance: float | None = None) -> dict:
    recipe = yaml.safe_load((CONFIGS / "best.yaml").read_text())
    config = _local(recipe, tiny_lm["model"], f"{tiny_lm['text']}:all", tmp_path)
    config["model"]["optimizer"]["init_args"]["lr"] = lr
    config["model"]["lr_scheduler"] = None  # warmup would tame the wrecking learning rate below
    config["trainer"].update(max_epochs=2, limit_train_batches=2)
    if significance is None:
        config["model"]["refine_codes"] = True  # auto decides by the significance these runs go without
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelQualityCallback"):
            cb["init_args"].update(at_start=at_start, significance=significance)
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["monitor"] = "val/perplexity" if significance is None else "val/perplexity_significant"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    return torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=False, map_location="cpu")


def test_a_start_better_than_every_trained_epoch_is_the_selected_checkpoint(tiny_lm, tmp_path, cache):
    # A learning rate this large wrecks the factors in one step: only the start is any good.
    best = _fit(tiny_lm, tmp_path, lr=10.0, at_start=None)
    assert best["global_step"] == 0
    metrics = (next((tmp_path / "logs").rglob("metrics.csv"))).read_text().splitlines()
    column = metrics[0].split(",").index("val/perplexity")
    values = [float(line.split(",")[column]) for line in metrics[1:] if line.split(",")[column]]
    assert len(values) == 3 and values[0] == min(values)  # step 0, then two trained epochs


def test_without_the_start_measurement_a_trained_epoch_is_selected(tiny_lm, tmp_path, cache):
    best = _fit(tiny_lm, tmp_path, lr=10.0, at_start=False)
    assert best["global_step"] > 0


def _column(tmp_path: Path, name: str) -> list[float]:
    lines = next((tmp_path / "logs").rglob("metrics.csv")).read_text().splitlines()
    column = lines[0].split(",").index(name)
    return [float(line.split(",")[column]) for line in lines[1:] if line.split(",")[column]]


def test_a_trained_epoch_that_looks_better_replaces_the_start_only_if_the_gain_is_significant(tiny_lm, tmp_path, cache):
    lr = 0.1  # large enough that some trained epoch measures better than the start on this tiny model
    plain = _fit(tiny_lm, tmp_path / "plain", lr=lr, at_start=None)
    measured = _column(tmp_path / "plain", "val/perplexity")
    assert min(measured[1:]) < measured[0] and plain["global_step"] > 0  # training gains on validation
    # No gain on a few hundred tokens is a million standard errors: the guard keeps the start.
    guarded = _fit(tiny_lm, tmp_path / "guarded", lr=lr, at_start=None, significance=1e6)
    assert guarded["global_step"] == 0
    assert _column(tmp_path / "guarded", "val/perplexity") == measured  # the guard changes selection, not training
    assert _column(tmp_path / "guarded", "val/perplexity_significant") == [measured[0]] * len(measured)
    z = _column(tmp_path / "guarded", "val/perplexity_z")
    assert [v > 0 for v in z] == [v < measured[0] for v in measured[1:]]  # z's sign is the gain's
    # A guard any gain passes selects as plain selection does.
    loose = _fit(tiny_lm, tmp_path / "loose", lr=lr, at_start=None, significance=1e-9)
    assert loose["global_step"] == plain["global_step"]


def test_a_guard_without_the_start_measurement_is_refused(tiny_lm, tmp_path, cache, capsys):
    with pytest.raises(SystemExit):
        _fit(tiny_lm, tmp_path, lr=1e-3, at_start=False, significance=2.0)
    assert "the start is not measured" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()
