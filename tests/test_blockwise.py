"""Block by block: the same stored forms as the whole-model path, one block of weights in memory at a time."""

import shutil

import pytest
import torch
from conftest import char_tokenizer

from aecompress.compress.blockwise import compress_blockwise
from aecompress.compress.choices import MethodChoice
from aecompress.compress.pipeline import closed_form
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.selection import select_groups
from aecompress.data.calibration import Calibration
from aecompress.formats.lazy import open_lazy
from aecompress.formats.sources import load_model


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_dirs, tiny_lm):
    """Tiny Llama and BERT checkpoints with a tokenizer, and text to calibrate on."""
    bert = tmp_path_factory.mktemp("blockwise") / "bert"
    shutil.copytree(tiny_dirs["bert"], bert)
    char_tokenizer(bert)
    return {"llama": tiny_lm["model"], "bert": bert, "text": f"{tiny_lm['text']}:all[-2048:]"}


def _forms(directory, text, choice, whole: bool, mode="separated", sequential=False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model, files = (load_model(str(directory))[0], None) if whole else open_lazy(str(directory))[:2]
    groups = select_groups(model, ["all"], mode)
    windows = Calibration(model, tokenizer, text, 1000, 32, cache_key=None)  # 31 windows: batches of 4, the last of 3
    target = Budget.of_bits(3)
    if whole:
        return closed_form(model, windows, choice, groups, target, None)[0]
    return compress_blockwise(model, files, windows, choice, groups, target, sequential=sequential)


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("method,options", [("compensated", {"group_size": 16, "fill": True}),
                                            ("whitened_svd", {}), ("quantize", {"group_size": 16, "dtype": "float16"})])
def test_block_by_block_gives_bit_identical_stored_forms(models, family, method, options):
    choice = MethodChoice(method=method, options=options)
    whole, blocks = (_forms(models[family], models["text"], choice, w) for w in (True, False))
    assert [f.group for f in whole] == [f.group for f in blocks] and len(whole) == (14 if family == "llama" else 12)
    for a, b in zip(whole, blocks):
        assert a.meta == b.meta and a.tensors.keys() == b.tensors.keys()
        for key in a.tensors:
            assert torch.equal(a.tensors[key], b.tensors[key]), (a.group.name, key)


def test_sequential_inputs_change_only_the_blocks_after_the_first(models):
    choice = MethodChoice(method="compensated", options={"group_size": 16})
    plain, sequential = (_forms(models["llama"], models["text"], choice, False, sequential=s) for s in (False, True))
    first = [torch.equal(a.tensors["codes"], b.tensors["codes"]) for a, b in zip(plain, sequential)
             if a.group.members[0].layer == 0]
    later = [torch.equal(a.tensors["codes"], b.tensors["codes"]) for a, b in zip(plain, sequential)
             if a.group.members[0].layer == 1]
    assert all(first) and not all(later)


def test_groups_across_blocks_and_a_tune_on_several_processes_are_refused_in_one_line(models):
    with pytest.raises(AECompressError, match="spans blocks 0..1; .* give --mode separated"):
        _forms(models["llama"], models["text"], MethodChoice(method="svd"), False, mode="concatenated")
    with pytest.raises(AECompressError, match="tunes each block in this one process; --devices 2 .* give --devices 1"):
        _forms(models["llama"], models["text"], MethodChoice(method="compensated", tune={"steps": 5, "devices": 2}),
               False)
    with pytest.raises(AECompressError, match="needs fisher"):
        _forms(models["llama"], models["text"], MethodChoice(method="fwsvd"), False)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_block_covariances_are_the_whole_models_to_the_last_bit(models, family):
    from transformers import AutoTokenizer

    from aecompress.data import blockwise
    from aecompress.data.calibration import collect
    from aecompress.formats.blocks import BlockReader

    tokenizer = AutoTokenizer.from_pretrained(models[family])
    model = load_model(str(models[family]))[0]
    ids = Calibration(model, tokenizer, models["text"], 1000, 32, cache_key=None).windows()
    groups = select_groups(model, ["all"], "separated")
    whole = collect(model, groups, ids, what=("covariance",))
    skeleton, files = open_lazy(str(models[family]))[:2]
    reader = BlockReader(skeleton, files)
    hidden, calls = blockwise.block_calls(reader.body(), reader.blocks, ids)
    for index in range(len(reader.blocks)):
        mine = [g for g in groups if g.members[0].layer == index]
        found = blockwise.block_statistics(skeleton, reader.load(index), mine, hidden, calls[index], ids.numel(), True)
        for group in mine:
            assert found[group.name].tokens == whole[group.name].tokens
            assert torch.equal(found[group.name].covariances[0], whole[group.name].covariances[0]), group.name
        reader.release(index)


def _block_errors(models, forms) -> list[float]:
    """Each block's output error against the original's, on the calibration batches, with these forms."""
    from transformers import AutoTokenizer

    from aecompress.compress.block_tuning import BlockStudent
    from aecompress.data import blockwise
    from aecompress.formats.blocks import BlockReader

    skeleton, files = open_lazy(str(models["llama"]))[:2]
    ids = Calibration(skeleton, AutoTokenizer.from_pretrained(models["llama"]), models["text"], 1000, 32,
                      cache_key=None).windows()
    reader = BlockReader(skeleton, files)
    hidden, calls = blockwise.block_calls(reader.body(), reader.blocks, ids)
    errors = []
    for index in range(len(reader.blocks)):
        block = reader.load(index)
        outputs = list(hidden)
        blockwise.run_block(block, outputs, calls[index])
        mine = [f for f in forms if f.group.members[0].layer == index]
        errors.append(BlockStudent(skeleton, block, reader.block_prefix(index), mine).objective(hidden, outputs,
                                                                                                 calls[index]))
        hidden[:] = outputs
        reader.release(index)
    return errors


@pytest.mark.parametrize("sequential", [False, True])
def test_the_block_tune_lowers_every_blocks_output_error_and_keeps_the_bytes(models, sequential):
    plain = _forms(models["llama"], models["text"], MethodChoice(method="compensated", options={"group_size": 16}),
                   False, sequential=sequential)
    tuned = _forms(models["llama"], models["text"], MethodChoice(method="compensated", options={"group_size": 16},
                                                               tune={"steps": 20, "lr": 0.01}), False,
                   sequential=sequential)
    for a, b in zip(plain, tuned):
        assert b.bytes == a.bytes and torch.equal(a.tensors["codes"], b.tensors["codes"]) if not sequential else True
        record = b.meta["block_tune"]
        assert record["kept"] and record["objective_after"] < record["objective_before"]
        assert not torch.equal(a.tensors["scale"], b.tensors["scale"])  # the factors were folded in
    if not sequential:  # the same inputs as the untuned forms saw: every block's error is lower with the tune
        assert all(t < p for t, p in zip(_block_errors(models, tuned), _block_errors(models, plain)))


def test_a_block_tune_that_makes_things_worse_is_dropped(models):
    plain = _forms(models["llama"], models["text"], MethodChoice(method="compensated", options={"group_size": 16}), False)
    wild = _forms(models["llama"], models["text"], MethodChoice(method="compensated", options={"group_size": 16},
                                                              tune={"steps": 3, "lr": 50.0}), False)
    for a, b in zip(plain, wild):
        assert not b.meta["block_tune"]["kept"]
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_compress_tunes_block_by_block_and_the_card_says_so(models, tmp_path, capsys, cache):
    from conftest import run_cli

    code, out, err = run_cli(capsys, "compress", "--model", models["llama"], "--bits", "3", "--mode", "separated",
                             "--blockwise", "true", "--tune_steps", "10", "--tune_lr", "0.01", "--calibration",
                             models["text"], "--calibration_window", "32", "--out_dir", tmp_path / "out")
    assert code == 0, err
    import json

    groups = json.loads((tmp_path / "out" / "aecompress.json").read_text())["groups"]
    assert all(g["meta"]["block_tune"]["kept"] for g in groups) and not any("tune" in g["meta"] for g in groups)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Tune, block by block: only the stored scales" in card and "kept in 2 of 2 blocks." in card


def test_the_whole_model_tune_follows_the_block_tune_and_the_card_says_both(models, tmp_path, capsys, cache):
    from conftest import run_cli

    args = ["compress", "--model", models["llama"], "--bits", "3", "--mode", "separated", "--blockwise", "true",
            "--tune_lr", "0.01", "--calibration", models["text"], "--calibration_window", "32"]
    code, out, err = run_cli(capsys, *args, "--tune_steps", "5", "--model_tune_steps", "8", "--model_tune_lr", "0.02",
                             "--out_dir", tmp_path / "both")
    assert code == 0, err
    assert "; then the whole-model tune, about" in out
    import json

    groups = json.loads((tmp_path / "both" / "aecompress.json").read_text())["groups"]
    whole = groups[0]["meta"]["tune"]
    assert all(g["meta"]["block_tune"]["kept"] and g["meta"]["tune"] == whole for g in groups)
    assert whole["kept"] and whole["objective_after"] < whole["objective_before"] and whole["lr"] == 0.02
    card = (tmp_path / "both" / "README.md").read_text()
    assert "kept in 2 of 2 blocks. Then, on the whole model, only the stored scales" in card
    assert "for 5 steps (Adam, lr 0.01)" in card and "for 8 steps (Adam, lr 0.02" in card
    assert f"went from {whole['objective_before']:.4g}" in card
    code, _, err = run_cli(capsys, *args, "--tune_steps", "5", "--out_dir", tmp_path / "blocks")
    blocks = json.loads((tmp_path / "blocks" / "aecompress.json").read_text())["groups"]
    for a, b in zip(blocks, groups):  # the whole-model tune starts from the block tune's scales and changes them
        assert a["meta"]["block_tune"] == b["meta"]["block_tune"] and "tune" not in a["meta"]
    from safetensors.torch import load_file

    after, before = (load_file(tmp_path / d / "model.safetensors") for d in ("both", "blocks"))
    assert any(not torch.equal(after[k], before[k]) for k in after)


@pytest.mark.parametrize("extra,message", [
    ([], "this takes the whole-model path, whose tune is --tune_steps"),
    (["--blockwise", "false"], "this takes the whole-model path, whose tune is --tune_steps"),
    (["--max_memory", "100GB"], "this takes the whole-model path, whose tune is --tune_steps"),
    (["--blockwise", "true", "--devices", "2"], "--devices 2 applies to the whole-model tune: give --devices 1"),
    (["--blockwise", "true", "--method", "svd"], "method 'svd' has no scales to tune"),
    (["--blockwise", "true", "--model_tune_lr", "0"], "tune lr 0.0 is not valid; it must be a positive float")])
def test_a_whole_model_tune_that_cannot_follow_the_blocks_is_refused_in_one_line(models, tmp_path, capsys, cache,
                                                                                  extra, message):
    from conftest import run_cli

    code, _, err = run_cli(capsys, "compress", "--model", models["llama"], "--bits", "3", "--mode", "separated",
                           "--tune_steps", "0", "--model_tune_steps", "4", "--calibration", models["text"],
                           "--calibration_window", "32", "--out_dir", tmp_path / "out", *extra)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_the_plan_refuses_a_whole_model_tune_over_the_ceiling_before_anything_is_read(capsys):
    from aecompress.compress.memory_plan import Estimate, choose

    whole, blocks, tune = (Estimate(path, {"parts": size}) for path, size in
                           (("whole model", 9 * 10**9), ("block by block", 2 * 10**9), ("whole model", 5 * 10**9)))
    with pytest.raises(AECompressError, match=r"--model_tune_steps loads the whole model, about 5.00 GB \(parts 5.00 GB\), "
                                              r"over --max_memory 4.00 GB; give --model_tune_steps 0"):
        choose(4 * 10**9, None, whole, blocks, tune)
    assert choose(6 * 10**9, None, whole, blocks, tune) is True
    assert "; then the whole-model tune, about 5.00 GB" in capsys.readouterr().out


def test_a_tied_head_is_not_stored_block_by_block_either(models, tmp_path, capsys, cache):
    """SmolLM2 ties its head to its embedding; block by block gives the embedding a new tensor, so the reader ties
    the head to it again (this compact export once failed: the files do not hold 'lm_head.weight')."""
    import transformers
    from conftest import run_cli

    tied = tmp_path / "tied"
    config = transformers.AutoConfig.from_pretrained(models["llama"])
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tied)
    char_tokenizer(tied)
    outs = {}
    for path in ("false", "true"):
        code, _, err = run_cli(capsys, "compress", "--model", tied, "--bits", "3", "--mode", "separated", "--tune_steps",
                               "0", "--blockwise", path, "--format", "compact", "--calibration", models["text"],
                               "--calibration_window", "32", "--out_dir", tmp_path / path)
        assert code == 0, err
        outs[path] = (tmp_path / path / "remaining.safetensors").read_bytes()
    assert outs["false"] == outs["true"]
    from aecompress import load_compact

    model = load_compact(tmp_path / "true")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
