"""A run that starts from a factorization can never be selected worse than that start."""

from pathlib import Path

import torch
import yaml

from aecompress.cli import main
from tests.test_shipped_recipes import CONFIGS, _local


def _fit(tiny_lm, tmp_path: Path, lr: float, at_start: bool | None) -> dict:
    recipe = yaml.safe_load((CONFIGS / "best.yaml").read_text())
    config = _local(recipe, tiny_lm["model"], f"{tiny_lm['text']}:all", tmp_path)
    config["model"]["optimizer"]["init_args"]["lr"] = lr
    config["model"]["lr_scheduler"] = None  # warmup would tame the wrecking learning rate below
    config["trainer"].update(max_epochs=2, limit_train_batches=2)
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelQualityCallback"):
            cb["init_args"]["at_start"] = at_start
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
