"""The shipped recipes, exactly as written, train one step on a tiny model.

``test_configs`` proves every YAML parses; this proves the seed recipe
(``paper.yaml``) and our best recipes (``best.yaml``, ``best_encoder.yaml``)
also *run*: their encoders, decoders, inits, losses, storage dtypes,
optimizers, schedulers and callbacks work together. Only the model, the text
the ratio and the output directories are swapped for tiny local ones.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from aecompress.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


def _local(recipe: dict, model: Path, text: str, workdir: Path) -> dict:
    """The recipe with a tiny model, local text, one step and its outputs under ``workdir``."""
    # Ratio 2: a 2-layer, hidden-32 model cannot hold a seed decoder at ratio 10.
    data = {**recipe["data"], "model": str(model), "ratio": 2.0}
    if data.get("calibration"):
        data.update(calibration=f"{text}[-1024:]", calibration_tokens=512, calibration_window=64)
    trainer = {**recipe["trainer"], "max_steps": -1, "max_epochs": 1, "limit_train_batches": 1, "accelerator": "cpu",
               "check_val_every_n_epoch": 1, "enable_progress_bar": False, "default_root_dir": str(workdir)}
    trainer["logger"] = {**trainer["logger"], "init_args": {**trainer["logger"]["init_args"],
                                                           "save_dir": str(workdir / "logs")}}
    callbacks = []
    for cb in trainer["callbacks"]:
        args = dict(cb.get("init_args", {}))
        if cb["class_path"].endswith("ModelQualityCallback"):
            args.update(data=text, window=32, every_n_epochs=1, max_tokens=256)
        if cb["class_path"].endswith("FitReport"):
            args.update(data=text, window=32, max_tokens=256)
        if cb["class_path"].endswith("ModelCheckpoint"):
            args["dirpath"] = str(workdir / "ckpt")
            args.pop("every_n_epochs", None)  # the one trained epoch must be a checkpoint epoch
        callbacks.append({**cb, "init_args": args})
    trainer["callbacks"] = callbacks
    return {**recipe, "data": data, "trainer": trainer}


@pytest.mark.parametrize("name", ["paper.yaml", "best.yaml", "best_encoder.yaml"])
def test_shipped_recipe_trains_one_step_and_saves_its_best_checkpoint(name, tiny_lm, tiny_bert_lm, tmp_path, cache,
                                                                     capsys):
    recipe = yaml.safe_load((CONFIGS / name).read_text())
    model = tiny_bert_lm if recipe["data"]["model"] == "minilm-l6" else tiny_lm["model"]
    config = tmp_path / name
    config.write_text(yaml.safe_dump(_local(recipe, model, f"{tiny_lm['text']}:all", tmp_path)))
    main(["fit", "--config", str(config)])
    printed = capsys.readouterr().out
    assert "fit took" in printed and "validation" in printed and "best checkpoint:" in printed
    checkpoint = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=False, map_location="cpu")
    # The best checkpoint is the one trained step, or the factorization start if that step made it worse.
    assert checkpoint["global_step"] in ((0, 1) if recipe["model"].get("init", "random") != "random" else (1,))
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    assert "train/loss" in metrics.splitlines()[0]  # the step ran and was logged
    monitor = next(cb["init_args"]["monitor"] for cb in recipe["trainer"]["callbacks"] if "monitor" in cb["init_args"])
    assert any(monitor in str(state) for state in checkpoint["callbacks"].values())
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    if any(cb["class_path"].endswith("FitReport") for cb in recipe["trainer"]["callbacks"]):
        report = json.loads((tmp_path / "ckpt" / "report.json").read_text())
        names = [row["name"] for row in report["rows"]]
        assert names[0] == "original" and {"svd", "whitened_svd", "compensated (untuned)"} <= set(names)
        assert "quality on" in printed and "aecompress compress --model model --bits 16 --out_dir DIR" in printed
        measured = [row for row in report["rows"] if row["bits_per_weight"] is not None]
        assert max(r["stored_bytes"] for r in measured[1:]) <= measured[0]["stored_bytes"] * 1.05  # the same size


@pytest.fixture(scope="session")
def tiny_bert_lm(tmp_path_factory) -> Path:
    """A tiny BERT encoder with the character tokenizer (stands in for MiniLM)."""
    from tests.conftest import build_tiny, char_tokenizer

    directory = tmp_path_factory.mktemp("tiny_bert") / "model"
    build_tiny("bert").save_pretrained(directory)
    char_tokenizer(directory)
    return directory
