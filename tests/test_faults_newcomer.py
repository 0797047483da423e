"""The fault matrix, part two: what a newcomer's first runs found (issue 18).

Every defect here exited 0 with a wrong result, printed a traceback, or wrote over something it
should not have. Each test drives the real entry point and asserts one clear error line and a
non-zero exit, or the safe outcome.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import run_cli, write_config

REPO = Path(__file__).resolve().parents[1]


run = run_cli


def one_line(capsys, pattern: str, *args) -> str:
    """Exit 2, and stderr's last line is one ``aecompress: error:`` line matching ``pattern``, with no traceback."""
    code, _, err = run(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err and "usage:" not in err, err[-2000:]
    assert lines and lines[-1].startswith("aecompress: error: ") and re.search(pattern, lines[-1]), lines[-1:]
    return lines[-1]


def test_export_refuses_a_config_that_differs_from_the_checkpoint(fitted, tmp_path, capsys):
    one_line(capsys, r"written by another config: .*enforce_norm: checkpoint True, this config False",
             "export", "--config", fitted["cfg"], "--model.enforce_norm", "false", "--ckpt_path", fitted["ckpt"],
             "--out_dir", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fmt", ["decoded", "compact"])
def test_a_checkpoint_whose_decoder_holds_nan_is_refused_before_anything_is_written(fitted, tmp_path, capsys, fmt):
    checkpoint = torch.load(fitted["ckpt"], weights_only=True)
    name = next(k for k in checkpoint["state_dict"] if "decoder" in k and k.endswith("weight"))
    checkpoint["state_dict"][name].view(-1)[:4] = float("nan")
    torch.save(checkpoint, tmp_path / "damaged.ckpt")
    one_line(capsys, r"group 'key' .*decodes to NaN or inf", "export", "--config", fitted["cfg"],
             "--ckpt_path", tmp_path / "damaged.ckpt", "--out_dir", tmp_path / "x", "--format", fmt)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_fit_never_writes_over_the_users_own_config(tiny_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "config.yaml", tiny_dirs["bert"], ["key"], tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["trainer"].update(logger=False, default_root_dir=str(tmp_path))
    data["trainer"]["callbacks"] = []
    cfg.write_text(yaml.safe_dump(data))
    before = cfg.read_bytes()
    code, _, err = run(capsys, "fit", "--config", cfg)
    assert code == 0, err[-2000:]
    assert cfg.read_bytes() == before
    saved = list(tmp_path.rglob("config.yaml"))
    assert len(saved) == 2 and any(p.parent != tmp_path for p in saved)  # the resolved one lives in the run's directory


@pytest.mark.parametrize("split", ["wiki:test", "PATH:test", "PATH:test[:512]"])
def test_a_test_split_is_refused_as_calibration_text(tiny_lm, tmp_path, capsys, split):
    spec = split.replace("PATH", str(tiny_lm["text"]))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_lm["model"], ["k_proj"], tmp_path,
                       **{"data.calibration": spec, "model.encoder": "free", "model.decoder": "linear",
                          "model.out_activation": "none", "model.init": "whitened_svd"})
    one_line(capsys, r"is a test split; calibrate on other text", "fit", "--config", cfg)


def test_an_export_into_its_own_source_model_is_refused(fitted, tiny_dirs, tmp_path, capsys):
    source = Path(tiny_dirs["bert"])
    before = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    one_line(capsys, r"is the source model's own directory", "export", "--config", fitted["cfg"],
             "--ckpt_path", fitted["ckpt"], "--out_dir", source, "--overwrite")
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()} == before


def test_empty_text_names_its_size_and_the_minimum(tiny_lm, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line(capsys, r"holds no text \(0 characters\); it needs at least one window", "evaluate",
             "--model", tiny_lm["model"], "--data", f"{empty}:all", "--window", "32")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_lm["model"], ["k_proj"], tmp_path,
                       **{"data.calibration": f"{empty}:all", "data.calibration_window": 32, "model.encoder": "free",
                          "model.decoder": "linear", "model.out_activation": "none", "model.init": "whitened_svd"})
    one_line(capsys, r"holds no text \(0 characters\)", "fit", "--config", cfg)


def test_a_zero_byte_checkpoint_is_one_line(fitted, tmp_path, capsys):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    one_line(capsys, r"cannot read checkpoint '.*empty\.ckpt' safely", "export", "--config", fitted["cfg"],
             "--ckpt_path", tmp_path / "empty.ckpt", "--out_dir", tmp_path / "x")


def test_a_test_split_for_the_validation_callback_is_one_line(fitted, tmp_path, capsys):
    extra = tmp_path / "cb.yaml"
    extra.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "aecompress.training.callbacks.ModelQualityCallback", "init_args": {"data": "wiki:test"}}]}}))
    one_line(capsys, r"ModelQualityCallback data 'wiki:test' is a test split", "fit", "--config", fitted["cfg"],
             "--config", extra)


@pytest.mark.parametrize("flag,pattern", [
    (["--data.foo", "1"], r"unknown option 'data.foo'; valid data keys: .*ratio"),
    (["--model.encoder", "bogus"], r"model.encoder 'bogus' is not valid; valid: mlp, linear, free"),
    (["--data.ratio", "abc"], r'data.ratio.*Expected a .*float.*abc'),
])
def test_bad_options_say_the_error_first_without_the_usage_dump(fitted, capsys, flag, pattern):
    one_line(capsys, pattern, "fit", "--config", fitted["cfg"], *flag)


def test_version_and_the_command_list(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and re.fullmatch(r"aecompress \d+\.\d+\.\d+\n", out)
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(name in out for name in ("fit", "export", "evaluate", "benchmark", "verify", "runtime-bench"))
    code, _, err = run(capsys)
    assert code == 2 and "evaluate" in err and "no command given" in err


def test_export_help_is_exports_own_options(capsys):
    code, out, _ = run(capsys, "export", "--help")
    assert code == 0 and "--ckpt_path" in out and "--out_dir" in out
    assert "--trainer." not in out and len(out.splitlines()) < 60


def test_exported_files_are_readable_by_everyone_the_umask_allows(fitted, tmp_path, capsys):
    code, _, err = run(capsys, "export", "--config", fitted["cfg"], "--ckpt_path", fitted["ckpt"],
                       "--out_dir", tmp_path / "c", "--format", "compact")
    assert code == 0, err[-2000:]
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "c").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_killed_exports_leftover_is_removed_by_the_next_run(fitted, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".out.tmp-{int(dead.stdout)}-0123abcd"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    code, _, err = run(capsys, "export", "--config", fitted["cfg"], "--ckpt_path", fitted["ckpt"],
                       "--out_dir", tmp_path / "out")
    assert code == 0, err[-2000:]
    assert not leftover.exists() and "interrupted write" in err


@pytest.mark.parametrize("content,pattern", [
    (b"caf\xe9 au lait " * 200, r"is not UTF-8 \(byte 3"),
    (b"\x00\x01binary" * 200, r"holds NUL bytes: it is binary"),
])
def test_text_that_is_not_utf8_is_refused_not_guessed(tiny_lm, tmp_path, capsys, content, pattern):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    one_line(capsys, pattern, "evaluate", "--model", tiny_lm["model"], "--data", f"{path}:all", "--window", "32")


def test_a_handful_of_tokens_is_measured_with_a_warning(tiny_lm, capsys):
    code, _, err = run(capsys, "evaluate", "--model", tiny_lm["model"], "--data", f"{tiny_lm['text']}:all[:8]",
                       "--window", "4")
    assert code == 0 and re.search(r"perplexity is measured on only \d+ tokens; a value from so few is noise", err)


def test_a_token_slice_works_for_embedding_fidelity(tiny_dirs, tiny_lm, tmp_path, capsys):
    code, out, err = run(capsys, "evaluate", "--model", tiny_dirs["bert"], "--reference", tiny_dirs["bert"],
                         "--metrics", "embedding_fidelity", "--data", f"{tiny_lm['text']}:all[:600]",
                         "--json", tmp_path / "r.json")
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["embedding_fidelity"] == pytest.approx(1.0)


def test_normal_runs_are_quiet_and_verbose_restores_the_logs(tiny_dirs, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_dirs["bert"], ["key"], tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    quiet = subprocess.run([sys.executable, "-m", "aecompress", "fit", "--config", str(cfg)], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    noise = ("litlogger", "GPU available", "TPU available", "DeprecationWarning", "LeafSpec")
    assert not [n for n in noise if n in quiet.stderr + quiet.stdout], quiet.stderr[-2000:]
    loud = subprocess.run([sys.executable, "-m", "aecompress", "fit", "-v", "--config", str(cfg)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert loud.returncode == 0 and "GPU available" in loud.stderr + loud.stdout


def test_every_export_writes_its_own_model_card_and_no_local_path(fitted, tiny_dirs, tmp_path, capsys):
    code, _, err = run(capsys, "export", "--config", fitted["cfg"], "--ckpt_path", fitted["ckpt"],
                       "--out_dir", tmp_path / "e")
    assert code == 0, err[-2000:]
    card = (tmp_path / "e" / "README.md").read_text()
    source_card = Path(tiny_dirs["bert"]) / "README.md"
    assert not source_card.exists() or card != source_card.read_text()
    assert "bits per weight" in card and "whole model" in card and "`ae`" in card and "## License" in card
    sidecar = (tmp_path / "e" / "aecompress.json").read_text()
    for text in (card, sidecar):
        assert str(tmp_path) not in text and str(tiny_dirs["bert"]) not in text
    assert json.loads(sidecar)["source_model"] == Path(tiny_dirs["bert"]).name
