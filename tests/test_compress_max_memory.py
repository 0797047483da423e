"""``aecompress compress --max_memory`` / ``--blockwise``: the path that fits, and the same export either way."""

import json

import pytest
from conftest import run_cli

from aecompress.compress.memory_plan import parse_bytes
from aecompress.core.errors import AECompressError


def _args(tiny_lm, out, *extra):
    text = f"{tiny_lm['text']}:all"
    return ["compress", "--model", tiny_lm["model"], "--bits", "3", "--calibration", f"{text}[-2048:]",
            "--calibration_window", "64", "--tune_steps", "0", "--mode", "separated", "--out_dir", out, *extra]


@pytest.mark.parametrize("fmt,files", [("decoded", ["model.safetensors"]),
                                       ("compact", ["compressed.safetensors", "remaining.safetensors"])])
def test_block_by_block_writes_the_same_export_as_the_whole_model(tiny_lm, tmp_path, capsys, cache, fmt, files):
    code, out, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "whole", "--format", fmt))
    assert code == 0, err
    assert "compress path" not in out, "without --max_memory or --blockwise the path is today's, unannounced"
    code, out, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "blocks", "--format", fmt, "--blockwise", "true"))
    assert code == 0, err
    assert "compress path: block by block, about" in out and "(--blockwise true)" in out
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "blocks" / name).read_bytes(), name
    whole, blocks = (json.loads((tmp_path / d / "aecompress.json").read_text())["groups"] for d in ("whole", "blocks"))
    assert whole == blocks and len(whole) == 14
    if fmt == "compact":
        code, _, err = run_cli(capsys, "verify", tmp_path / "blocks")
        assert code == 0, err


def test_max_memory_picks_the_path_that_fits_or_names_what_does_not(tiny_lm, tmp_path, capsys, cache):
    code, out, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "roomy", "--max_memory", "100GB"))
    assert code == 0, err
    assert "compress path: whole model: about" in out and "within --max_memory 100.00 GB" in out
    code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "tiny", "--max_memory", "1MB"))
    assert code != 0 and "--max_memory 1.0 MB is too small even block by block, which needs about" in err, err
    code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "joined", "--max_memory", "1MB", "--mode", "concatenated"))
    assert code != 0 and "spans blocks 0..1; block by block compresses one block at a time" in err, err
    code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "bad", "--max_memory", "6XB"))
    assert code != 0 and "--max_memory '6XB' is not a size" in err, err
    for path in ("tiny", "joined", "bad"):
        assert not (tmp_path / path).exists()


def test_sizes_are_read_with_their_units():
    assert parse_bytes("6GB") == 6 * 10**9 and parse_bytes("500 MB") == 5 * 10**8 and parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes(1234) == 1234 and parse_bytes("1.5kb") == 1500 and parse_bytes(None) is None
    for bad in ("-1GB", "0", "GB", "6 parsecs", True):
        with pytest.raises(AECompressError, match="is not a size"):
            parse_bytes(bad)


def test_a_ceiling_over_a_model_that_is_not_a_local_safetensors_checkpoint_says_why(tiny_lm, tmp_path, capsys, cache):
    """Without safetensors there is no block by block: the line says so, not to drop a --blockwise the user never gave."""
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_lm["model"], pickled)
    for weights in pickled.glob("*.safetensors"):
        torch.save(load_file(weights), pickled / "pytorch_model.bin")
        weights.unlink()
    args = _args(tiny_lm, tmp_path / "out", "--max_memory", "1MB")
    args[args.index("--model") + 1] = pickled
    code, _, err = run_cli(capsys, *args)
    assert code != 0 and "over --max_memory 1.0 MB, and block by block needs a local safetensors checkpoint" in err, err
    assert "--blockwise false" not in err


@pytest.mark.parametrize("method,counted", [("compensated", True), ("quantize", False)])
def test_the_plan_counts_what_an_error_feedback_method_holds_while_it_codes(tiny_lm, capsys, method, counted):
    """compensated holds the inverse factor of a matrix's input covariance and float64 rows while it codes it (a
    7B-shaped block went 0.6 GB over a plan without them); quantize holds neither."""
    from aecompress.compress.choices import MethodChoice
    from aecompress.compress.memory_plan import open_model
    from aecompress.core.budget import Budget

    open_model(str(tiny_lm["model"]), ["all"], "separated", MethodChoice(method=method), Budget.of_bits(3), None, True,
               2048, window=64)
    assert ("the method's working copies" in capsys.readouterr().out) == counted
