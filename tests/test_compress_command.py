"""``aecompress compress``: a whole model by a closed-form method, no training, written as an export."""

import json

import torch
import transformers
from conftest import run_cli


def _args(tiny_lm, out, *extra):
    text = f"{tiny_lm['text']}:all"
    return ["compress", "--model", tiny_lm["model"], "--bits", "3", "--calibration", f"{text}[-2048:]",
            "--calibration_window", "64", "--out_dir", out, *extra]


def test_it_writes_a_model_plain_transformers_loads_within_the_budget(tiny_lm, tmp_path, capsys, cache):
    code, out, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "c3"))
    assert code == 0, err
    assert "bits per weight stored over 14 weights" in out and "seconds: load and calibration" in out
    assert "tune " in out and "peak resident memory" in out
    meta = json.loads((tmp_path / "c3" / "aecompress.json").read_text())
    assert {g["method"] for g in meta["groups"]} == {"compensated"}
    assert {g["meta"]["tuned_steps"] for g in meta["groups"]} == {100}, "compensated is tuned by default"
    assert meta["bits_per_weight"] <= 3 and meta["stored_bytes"] * 8 <= 3 * meta["original_numbers"]
    assert {g["meta"]["grid"] for g in meta["groups"]} == {"mse"} and {g["meta"]["zeros"] for g in meta["groups"]} == {"int"}
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm["model"])
    made = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c3")
    before, after = (m.model.layers[0].mlp.up_proj.weight for m in (original, made))
    assert not torch.equal(before, after) and float((before - after).norm() / before.norm()) < 0.5
    assert torch.equal(original.model.embed_tokens.weight, made.model.embed_tokens.weight)


def test_a_compact_export_verifies(tiny_lm, tmp_path, capsys, cache):
    code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "c", "--format", "compact", "--method", "quantize",
                                          "--options", '{"group_size": 16, "dtype": "float16", "grid": "mse"}',
                                          "--tune_steps", "5"))
    assert code == 0, err
    code, out, err = run_cli(capsys, "verify", tmp_path / "c")
    assert code == 0, err


def test_bad_input_is_one_clear_error_and_nothing_is_overwritten(tiny_lm, tmp_path, capsys, cache):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    for extra, message in (([], "exists; pass --overwrite"),):
        code, _, err = run_cli(capsys, *_args(tiny_lm, taken, *extra))
        assert code != 0 and message in err
    assert (taken / "mine.txt").read_text() == "keep me"
    for extra, message in ((["--method", "ae"], "--method 'ae' is not a closed-form method; valid: compensated"),
                           (["--allocation", "greedy"], "--allocation 'greedy' is not one of: uniform, measured"),
                           (["--format", "zip"], "--format 'zip' is not one of: decoded, compact"),
                           (["--tune_lr", "-1"], "tune lr -1.0 is not valid; it must be a positive float"),
                           (["--precision", "fp8"], "tune precision 'fp8' is not valid; it must be one of 32-true"),
                           (["--method", "svd", "--tune_steps", "5"], "method 'svd' has no scales to tune")):
        code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "new", *extra))
        assert code != 0 and message in err, err
        assert not (tmp_path / "new").exists()
    code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "new")[:-2], "--bits", "40", "--out_dir", tmp_path / "n")
    assert code != 0 and "--bits 40.0 must be above 0 and below 32" in err


def test_tuning_can_be_turned_off_and_the_export_is_then_untuned(tiny_lm, tmp_path, capsys, cache):
    code, out, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "plain", "--tune_steps", "0"))
    assert code == 0, err
    meta = json.loads((tmp_path / "plain" / "aecompress.json").read_text())
    assert all("tuned_steps" not in g["meta"] for g in meta["groups"])
