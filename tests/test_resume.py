"""``fit --ckpt_path last`` resumes a killed run to the state an uninterrupted run reaches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from aecompress.cli import main
from tests.conftest import write_config

ROOT = Path(__file__).parents[1]
EPOCHS = 4


class KillAt(L.Callback):
    """Ends the process the hard way (no cleanup, no checkpoint) when epoch ``epoch`` starts."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            os._exit(137)


def _config(tmp_path: Path, model_dir: Path, name: str, kill_at: int | None = None, **overrides) -> Path:
    work = tmp_path / name
    callbacks = [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(work / "ckpt"), "filename": "best", "monitor": "val/rel_fro",
                      "save_top_k": 1, "save_last": True, "enable_version_counter": False},
    }]
    if kill_at is not None:
        callbacks.append({"class_path": "tests.test_resume.KillAt", "init_args": {"epoch": kill_at}})
    return write_config(tmp_path / f"{name}.yaml", model_dir, ["k_proj", "up_proj"], work,
                        **{"trainer.max_epochs": EPOCHS, "trainer.callbacks": callbacks, **overrides})


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_dirs):
    """An uninterrupted run and a run killed as epoch 2 starts (last.ckpt holds epoch 1)."""
    tmp_path = tmp_path_factory.mktemp("resume")
    model = tiny_dirs["llama"]
    main(["fit", "--config", str(_config(tmp_path, model, "whole"))])
    done = subprocess.run(
        [sys.executable, "-m", "aecompress", "fit", "--config", str(_config(tmp_path, model, "run", kill_at=2))],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 137, done.stderr[-2000:]
    assert _state(tmp_path / "run" / "ckpt" / "last.ckpt")["epoch"] == 1
    return tmp_path, model


def test_resume_after_a_kill_reaches_the_same_end_state(killed):
    tmp_path, model = killed
    main(["fit", "--config", str(_config(tmp_path, model, "run")), "--ckpt_path", "last"])
    whole, resumed = _state(tmp_path / "whole" / "ckpt" / "last.ckpt"), _state(tmp_path / "run" / "ckpt" / "last.ckpt")
    assert resumed["epoch"] == whole["epoch"] == EPOCHS - 1
    assert resumed["global_step"] == whole["global_step"]
    assert whole["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_resume_with_another_config_is_refused(killed, capsys):
    tmp_path, model = killed
    other = _config(tmp_path, model, "run", **{"data.ratio": 2.0})
    before = (tmp_path / "run" / "ckpt" / "last.ckpt").read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(other), "--ckpt_path", "last"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was written by another config: target_ratio: checkpoint 4.0, this config 2.0" in last, last
    assert (tmp_path / "run" / "ckpt" / "last.ckpt").read_bytes() == before


@pytest.mark.parametrize("latent_storage,refused", [("dtype", False), ("int8", True)])
def test_a_checkpoint_from_before_a_spec_field_existed_is_read_with_its_default(tiny_dirs, latent_storage, refused):
    from aecompress.training.checkpoints import differences, normalized
    from aecompress.training.datamodule import WeightRowsDataModule
    from aecompress.training.module import CompressorModule

    dm = WeightRowsDataModule(model=str(tiny_dirs["llama"]), modules=["k_proj"], ratio=2.0)
    module = CompressorModule(groups=dm.group_specs, encoder="free", decoder="linear", out_activation="none",
                              enforce_norm=False, latent_storage=latent_storage)
    old = module.signature()
    old["specs"] = {name: {k: v for k, v in spec.items() if k != "latent_storage"} for name, spec in old["specs"].items()}
    problems = differences(normalized(old), module.signature())
    assert bool(problems) == refused
    if refused:
        assert "latent_storage" in problems[0]
