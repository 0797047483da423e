"""A new trained method is its file plus a row: ``fit`` trains it, ``export`` and ``verify`` take it.

The method is ``tests/linear_codec.py``; its row is added to the table here, as one line in
``aecompress/methods/__init__.py`` would add it. Nothing in training, formats or the CLI names it.
"""

import json

import pytest
import torch
import transformers

import aecompress
import aecompress.methods as catalogue
from aecompress.cli import main
from aecompress.core.budget import Budget
from tests import linear_codec
from tests.conftest import write_config


@pytest.fixture
def with_linear_codec(monkeypatch):
    monkeypatch.setitem(catalogue.METHODS, linear_codec.METHOD.name, linear_codec.METHOD)  # the table row


def test_fit_trains_the_method_the_config_names_and_its_exports_agree(tmp_path, tiny_dirs, with_linear_codec):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_dirs["llama"], ["k_proj"], tmp_path,
                       **{"model.method": "linear_codec", "model.options": {}, "data.bits_per_weight": 8.0,
                          "data.ratio": None})
    main(["fit", "--config", str(cfg)])
    ckpt = tmp_path / "ckpt" / "best.ckpt"
    for fmt in ("decoded", "compact"):
        main(["export", "--config", str(cfg), "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / fmt), "--format", fmt])
    meta = json.loads((tmp_path / "compact" / "aecompress.json").read_text())
    assert [g["method"] for g in meta["groups"]] == ["linear_codec"]
    group = meta["groups"][0]["group"]
    assert meta["stored_bytes"] <= Budget.of_bits(8.0).bytes(group["rows"], group["width"])
    decoded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "decoded").state_dict()
    compact = aecompress.load_compact(tmp_path / "compact").state_dict()
    assert all(torch.equal(decoded[k], compact[k]) for k in decoded)
    main(["verify", str(tmp_path / "compact")])


def test_its_options_and_a_closed_form_method_are_checked(tmp_path, tiny_dirs, with_linear_codec, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_dirs["llama"], ["k_proj"], tmp_path,
                       **{"model.method": "linear_codec", "model.options": {"depth": 2}})
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg)])
    assert "unknown option 'depth' for method 'linear_codec'; valid: rank" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg), "--model.method", "compensated", "--model.options", "{}"])
    assert "model.method 'compensated' is not a trained method; valid: ae, linear_codec" in capsys.readouterr().err
