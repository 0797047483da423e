"""Mixed precision: bf16-mixed on CPU here, bf16-mixed and 16-mixed on a GPU where there is one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aecompress.cli import main
from tests.conftest import write_config

CONFIGS = Path(__file__).parents[1] / "configs"


def _fit_export(tmp_path: Path, model_dir: Path, *extra: str) -> dict:
    cfg = write_config(tmp_path / "cfg.yaml", model_dir, ["k_proj"], tmp_path, **{"trainer.max_epochs": 2})
    main(["fit", "--config", str(cfg), *extra])
    main(["export", "--config", str(cfg), "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"),
          "--out_dir", str(tmp_path / "out"), "--format", "compact"])
    return json.loads((tmp_path / "out" / "aecompress.json").read_text())


def test_bf16_mixed_on_cpu(tmp_path, tiny_dirs):
    meta = _fit_export(tmp_path, tiny_dirs["llama"], "--config", str(CONFIGS / "bf16.yaml"))
    assert meta["achieved_ratio"] >= 4.0
    ckpt = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", ["bf16.yaml", "fp16.yaml"])
def test_mixed_precision_on_gpu(tmp_path, tiny_dirs, config):
    if config == "bf16.yaml" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    meta = _fit_export(tmp_path, tiny_dirs["llama"], "--config", str(CONFIGS / config),
                       "--trainer.accelerator", "gpu", "--trainer.devices", "1")
    assert meta["achieved_ratio"] >= 4.0
    ckpt = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
