"""The fault matrix, part three: ``aecompress compress`` and its calibration (issue 29, second pass).

Every defect here exited 0 with a wrong result, printed a traceback, gave advice that does not fit
``compress``, or replaced something that was not ours. Each test drives the real entry point and
asserts one clear error line and a non-zero exit, or the safe outcome.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import run_cli
from lightning.pytorch.utilities.exceptions import SIGTERMException

import aecompress.compress.pipeline as pipeline


def _args(tiny_lm, out, *extra, calibration=None):
    text = calibration or f"{tiny_lm['text']}:all[-2048:]"
    return ["compress", "--model", tiny_lm["model"], "--bits", "3", "--calibration", text,
            "--calibration_window", "64", "--out_dir", out, *extra]


def one_line(capsys, pattern: str, *args) -> str:
    """Exit 2, and stderr's last line is one ``aecompress: error:`` line matching ``pattern``, with no traceback."""
    code, _, err = run_cli(capsys, *args)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert "aecompress: error: " in last, last  # after what a progress bar left on the line, if any
    message = last[last.index("aecompress: error: "):]
    assert re.search(pattern, message), message
    return message


def test_a_tune_that_makes_things_worse_keeps_the_untuned_forms(tiny_lm, tmp_path, capsys, cache):
    code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "worse", "--tune_lr", "5", "--tune_steps", "2"))
    assert code == 0, err
    warned = [line for line in err.splitlines() if "kept the untuned forms" in line]
    assert len(warned) == 1 and "lower the tune's learning rate" in warned[0], err
    meta = json.loads((tmp_path / "worse" / "aecompress.json").read_text())
    assert all("tuned_steps" not in g["meta"] for g in meta["groups"]), "the worse tuned scales were exported"
    record = meta["groups"][0]["meta"]["tune"]
    assert record["kept"] is False and record["objective_after"] > record["objective_before"]


def test_overwrite_replaces_an_earlier_export_and_nothing_else(tiny_lm, tmp_path, capsys, cache):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "sub" / "data.csv").write_text("a,b\n1,2\n")
    one_line(capsys, r"'.*mine' is not an aecompress export .*--overwrite replaces only an earlier export",
             *_args(tiny_lm, mine, "--overwrite", "--tune_steps", "0"))
    assert (mine / "notes.txt").read_text() == "my notes" and (mine / "sub" / "data.csv").read_text() == "a,b\n1,2\n"
    earlier = tmp_path / "earlier"
    for _ in range(2):  # the second run replaces the first run's export
        code, _, err = run_cli(capsys, *_args(tiny_lm, earlier, "--overwrite", "--tune_steps", "0"))
        assert code == 0, err
    assert (earlier / "aecompress.json").is_file()


def test_calibration_holding_test_text_is_refused_by_content(tiny_lm, tmp_path, capsys, cache):
    text = tiny_lm["text"]
    one_line(capsys, r"calibration data '.*:all\[:2048\]' shares \d+ of its \d+ tokens with the test text .*:test",
             *_args(tiny_lm, tmp_path / "x", calibration=f"{text}:all[:2048]"))
    for tokens in ("-5", "0"):
        one_line(capsys, rf"calibration_tokens {tokens} must be a positive number of tokens",
                 *_args(tiny_lm, tmp_path / "x", "--calibration_tokens", tokens))
    assert not (tmp_path / "x").exists()
    code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "ok", "--tune_steps", "0",
                                          calibration=f"{text}:calibration"))
    assert code == 0, err


@pytest.mark.parametrize("extra, pattern", [
    (["--options", "{bits: 0}", "--tune_steps", "2"], r"compensated code_bits 0 .* must be an integer in 1\.\.8"),
    (["--options", "{code_bits: 0}", "--tune_steps", "2"], r"compensated code_bits 0 .* must be an integer in 1\.\.8"),
    (["--options", "{damp: -1}"], r"compensated damp -1 .* must be 0 or more"),
    (["--calibration_window", "1024"], r"calibration_window 1024 is longer than the model's 64 positions; use 2\.\.64"),
    (["--tune_lr", "1e9", "--tune_steps", "3"], r"tune loss became non-finite .*; lower the tune's learning rate"),
])
def test_bad_options_and_a_diverging_tune_are_one_line(tiny_lm, tmp_path, capsys, cache, extra, pattern):
    one_line(capsys, pattern, *_args(tiny_lm, tmp_path / "x", *extra))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("extra, pattern", [
    (["--precision", "junk", "--tune_steps", "0"], r"tune precision 'junk' is not valid"),
    (["--tune_lr", "-5", "--tune_steps", "0"], r"tune lr -5.0 is not valid"),
    (["--modules", "[]"], r"--modules \[\] is empty; give module types or patterns"),
])
def test_what_was_accepted_silently_is_refused(tiny_lm, tmp_path, capsys, cache, extra, pattern):
    one_line(capsys, pattern, *_args(tiny_lm, tmp_path / "x", *extra))


def test_sigterm_during_the_tune_gives_advice_that_fits_compress(tiny_lm, tmp_path, capsys, cache, monkeypatch):
    def stopped(*args, **kwargs):
        raise SIGTERMException()

    monkeypatch.setattr(pipeline, "tune", stopped)
    code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "x"))
    assert code == 128 + 15 and "--ckpt_path" not in err, err
    assert "nothing was written" in err and "rerun" in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_out_dir_is_refused_before_compressing(tiny_lm, tmp_path, capsys, cache, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        one_line(capsys, r"cannot write '.*locked/out': .*locked' is not writable", *_args(tiny_lm, locked / "out"))
    finally:
        locked.chmod(0o700)


def test_an_unwritable_out_dir_is_refused_before_compressing_even_as_root(tiny_lm, tmp_path, capsys, cache):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    one_line(capsys, r"cannot write '.*file/out': .*file' is not a directory", *_args(tiny_lm, blocker / "out"))


def test_an_infeasible_budget_is_said_in_bits_per_weight(tiny_lm, tmp_path, capsys, cache):
    line = one_line(capsys, r"0.01 bits per weight \(ratio 3200\) is infeasible for group .* with compensated .*; "
                            r"feasible budgets are [\d.]+ <= bits per weight < 32",
                    *_args(tiny_lm, tmp_path / "x", "--tune_steps", "0")[:-2], "--bits", "0.01",
                    "--out_dir", tmp_path / "x")
    assert line.index("bits per weight") < line.index("ratio")  # in the unit typed first


def test_too_little_calibration_text_names_compress_s_own_option(tiny_lm, tmp_path, capsys, cache):
    line = one_line(capsys, r"shorter than one calibration window of 64 tokens; use more .*or a smaller calibration_window",
                    *_args(tiny_lm, tmp_path / "x", calibration=f"{tiny_lm['text']}:all[-40:]"))
    assert "--window" not in line
