"""``aecompress compress``: a whole model by a closed-form method, no training, written as an export."""

import json
import shlex

import pytest
import torch
import transformers
from conftest import run_cli
from safetensors import safe_open


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
                           (["--method", "svd", "--tune_steps", "5"], "method 'svd' has no scales to tune"),
                           (["--dtype", "int8"], "--dtype 'int8' is not one of: float32, float16, bfloat16"),
                           (["--dtype", "bfloat16", "--format", "compact"],
                            "--dtype bfloat16 applies to the decoded format only")):
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
    card = (tmp_path / "plain" / "README.md").read_text()
    assert "- Tune: none (`--tune_steps 0`)" in card and "fine-tuned" not in card


def test_the_card_says_how_it_was_made_and_its_command_makes_it_again(tiny_lm, tmp_path, capsys, cache, monkeypatch):
    code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "first", "--tune_steps", "3", "--top_k", "8"))
    assert code == 0, err
    card = (tmp_path / "first" / "README.md").read_text()
    made = card.split("## How it was made", 1)[1]
    assert '- Method: `compensated` with options `{group_size: "auto", fill: true}` (the method\'s defaults), 3 bits ' \
           "per weight, uniform allocation, modules `[all]`." in made
    assert "- Calibration text: `text.txt:all[-2048:]`, 2,048 tokens in windows of 64" in made
    assert str(tmp_path) not in card and str(tiny_lm["text"].parent) not in card  # no path of this machine
    assert ("only the stored scales (the codes kept as they are, the same bytes) were fine-tuned for 3 steps (Adam, lr "
            "0.001, precision 32-true) so that this model's outputs match the original model's (top-8 next-token") in made
    assert "no labels, no task data" in made and "Its objective on the calibration windows went from" in made
    command = made.split("```bash\n", 1)[1].split("\n", 1)[0]
    assert command.startswith("aecompress compress --model model --out_dir first --bits 3.0 --method compensated ")
    assert "--tune_steps 3 --tune_lr 0.001 --top_k 8" in command and "--dtype float32" in command
    monkeypatch.chdir(tiny_lm["model"].parent)  # the card names the model and text by their names, never a path
    args = shlex.split(command)[1:]
    args[args.index("--out_dir") + 1] = str(tmp_path / "again")
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    first, again = (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d) for d in ("first", "again"))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def _logits(directory, ids) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    loaded = model.dtype  # as plain from_pretrained gives it; the logits are compared in float32
    with torch.no_grad():
        return model.float()(input_ids=ids).logits, loaded


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_export_loads_with_transformers_in_that_dtype_close_to_float32(tiny_lm, tmp_path, capsys,
                                                                                       cache, dtype):
    for name in ("float32", dtype):
        code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / name, "--tune_steps", "0", "--dtype", name))
        assert code == 0, err
    assert json.loads((tmp_path / dtype / "config.json").read_text())["dtype"] == dtype
    with safe_open(str(tmp_path / dtype / "model.safetensors"), framework="pt") as fh:
        assert {str(fh.get_slice(k).get_dtype()) for k in fh.keys()} == {"BF16" if dtype == "bfloat16" else "F16"}
    full = sum(p.stat().st_size for p in (tmp_path / "float32").glob("*.safetensors"))
    half = sum(p.stat().st_size for p in (tmp_path / dtype).glob("*.safetensors"))
    assert half < 0.55 * full
    assert json.loads((tmp_path / dtype / "aecompress.json").read_text())["dtype"] == dtype
    assert f"full-size {dtype} weights" in (tmp_path / dtype / "README.md").read_text()
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    (reference, kind), (rounded, loaded) = _logits(tmp_path / "float32", ids), _logits(tmp_path / dtype, ids)
    assert kind == torch.float32 and loaded == getattr(torch, dtype)
    assert not torch.equal(reference, rounded)  # the weights really were rounded
    # Every weight moved by at most half a unit in the last place of its dtype; the logits by as little.
    torch.testing.assert_close(rounded, reference, rtol=0.05, atol=0.05 if dtype == "bfloat16" else 0.01)
