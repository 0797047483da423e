"""``refine_codes: auto``: refinement columns only where validation says they help."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from aecompress.cli import main
from tests.test_shipped_recipes import CONFIGS, _local

FULL_RANK = 32  # the tiny Llama's up_proj: 128 rows of width 32; at ratio 2 the budget holds more columns


def _fit(tiny_lm, tmp_path: Path, refine, significance: float | None = 2.0, **script) -> dict:
    """best.yaml on the tiny Llama's up_proj at ratio 2; with ``script``, validation is scripted (tests.scripted)."""
    recipe = yaml.safe_load((CONFIGS / "best.yaml").read_text())
    config = _local(recipe, tiny_lm["model"], f"{tiny_lm['text']}:all", tmp_path)
    config["data"]["modules"] = ["up_proj"]
    config["model"]["refine_codes"] = refine
    config["trainer"].update(max_epochs=2, limit_train_batches=2)
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelQualityCallback"):
            cb["init_args"].update(significance=significance, **script)
            cb["class_path"] = "tests.scripted.ScriptedQuality" if script else cb["class_path"]
        if cb["class_path"].endswith("ModelCheckpoint") and script:  # the scripted measurement is a perplexity
            cb["init_args"]["monitor"] = "val/perplexity_significant"
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "-v", "--config", str(tmp_path / "config.yaml")])  # -v: the choice is logged at INFO
    return torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True, map_location="cpu")


def _perplexities(tmp_path: Path) -> list[float]:
    lines = next((tmp_path / "logs").rglob("metrics.csv")).read_text().splitlines()
    column = lines[0].split(",").index("val/perplexity")
    return [float(line.split(",")[column]) for line in lines[1:] if line.split(",")[column]]


def _latent(checkpoint: dict) -> int:
    return checkpoint["aecompress_signature"]["specs"]["up_proj"]["latent"]


def test_auto_drops_refinement_that_is_not_significantly_better_and_exports_the_plain_start(tiny_lm, tmp_path, cache,
                                                                                          capsys):
    plain = _fit(tiny_lm, tmp_path / "plain", refine=False)
    assert _latent(plain) == FULL_RANK
    # No start is a million standard errors better on a few hundred tokens: the plain start stays.
    capsys.readouterr()
    chosen = _fit(tiny_lm, tmp_path / "auto", refine="auto", significance=1e6)
    assert "refinement columns dropped" in capsys.readouterr().err
    assert chosen["aecompress_signature"]["specs"] == plain["aecompress_signature"]["specs"]
    assert _perplexities(tmp_path / "auto")[0] == _perplexities(tmp_path / "plain")[0]  # the same start, measured
    # Export rebuilds the spec the fit chose, not the refined one the config would build first.
    out = tmp_path / "export"
    main(["export", "--config", str(tmp_path / "auto" / "config.yaml"),
          "--ckpt_path", str(tmp_path / "auto" / "ckpt" / "best.ckpt"), "--out_dir", str(out)])
    (group,) = json.loads((out / "aecompress.json").read_text())["groups"]
    assert group["meta"]["spec"]["latent"] == FULL_RANK


def test_auto_keeps_refinement_that_measures_better_and_trains_as_refine_true_does(tiny_lm, tmp_path, cache, capsys):
    # Validation is scripted: the refined start measures better by design, and trained steps better still.
    script = dict(start=2.0, refined=1.0, trained=[0.6, 0.5])
    refined = _fit(tiny_lm, tmp_path / "refined", refine=True, **script)
    assert _latent(refined) > FULL_RANK and refined["global_step"] == 4
    capsys.readouterr()
    chosen = _fit(tiny_lm, tmp_path / "auto", refine="auto", **script)
    assert "refinement columns kept" in capsys.readouterr().err
    assert chosen["aecompress_signature"]["specs"] == refined["aecompress_signature"]["specs"]
    # Measuring both starts leaves the data order alone: training is the same as refine_codes: true.
    torch.testing.assert_close(chosen["state_dict"], refined["state_dict"], rtol=0, atol=0)


def test_auto_without_a_significance_to_decide_by_is_refused_before_any_checkpoint(tiny_lm, tmp_path, cache, capsys):
    with pytest.raises(SystemExit):
        _fit(tiny_lm, tmp_path, refine="auto", significance=None)
    assert "needs a ModelQualityCallback with significance set" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_refine_codes_names_its_valid_values(tiny_lm, tmp_path, cache, capsys):
    with pytest.raises(SystemExit):
        _fit(tiny_lm, tmp_path, refine="sometimes")
    assert "refine_codes" in capsys.readouterr().err
