"""The fault matrix, second pass: nothing wrong exits 0 (issue 29).

Each defect here exited 0 with a wrong result or printed a traceback. Each test drives the real
entry point (or, for a peer's manifest, the method the benchmark calls) and asserts one clear
error line and a non-zero exit, or the honest outcome.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
import transformers

from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import extract_rows
from aecompress.core.selection import select_groups
from aecompress.formats.export import export
from aecompress.formats.sidecar import COMPRESSED, MANIFEST, REMAINING, SIDECAR
from aecompress.methods import compress
from tests.conftest import build_tiny, fake_peer, run_cli
from tests.test_faults import leftovers, spawn, wait_for
from tests.test_faults_newcomer import one_line


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_lm) -> Path:
    """A compact export of the tiny Llama: 3-bit codes with a scale per 16 columns, and its tokenizer."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm["model"])
    forms = {g.name: compress("quantize", g, extract_rows(model, g), Budget.of_ratio(4.0), code_bits=3, group_size=16)
             for g in select_groups(model, ["k_proj", "up_proj"])}
    out = tmp_path_factory.mktemp("quantized") / "compact"
    export(model, forms, str(tiny_lm["model"]), "AutoModelForCausalLM", "tiny", str(out), "compact")
    return out


def fresh(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "copy"))


def edit_sidecar(directory: Path, change) -> None:
    """Change the sidecar's content, written in its own layout (so only the content differs)."""
    meta = json.loads((directory / SIDECAR).read_text())
    change(meta)
    (directory / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")


# --- the sidecar, and every other file of a compact export, is covered by a checksum ----------------


def test_one_changed_byte_in_any_file_of_a_compact_export_is_refused(quantized, tmp_path, capsys):
    names = sorted(p.name for p in quantized.iterdir())
    assert {SIDECAR, COMPRESSED, REMAINING, "config.json", "README.md", "tokenizer.json"} <= set(names)
    assert run_cli(capsys, "verify", quantized)[0] == 0
    for name in names:
        copy = fresh(quantized, tmp_path)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        code, out, err = run_cli(capsys, "verify", copy)
        assert code == 2 and err.strip().startswith("aecompress: error: ") and len(err.strip().splitlines()) == 1, (
            name, code, out, err[-500:])
        shutil.rmtree(copy)


def test_an_export_without_its_manifest_is_refused_unless_it_predates_manifests(quantized, tmp_path, capsys):
    copy = fresh(quantized, tmp_path)
    (copy / MANIFEST).unlink()
    one_line(capsys, r"is missing SHA256SUMS, which its aecompress\.json names", "verify", copy)
    edit_sidecar(copy, lambda meta: meta.pop("manifest"))  # as an export from before manifests
    code, out, err = run_cli(capsys, "verify", copy)
    assert code == 0 and "only the tensor files are covered" in out, err[-2000:]


def _bits(meta):
    meta["groups"][0]["meta"]["bits"] = 2


def _target(meta):
    meta["target_ratio"] = 16.0


def _source(meta):
    meta["source_model"] = "another-model"


@pytest.mark.parametrize("change", [_bits, _target, _source], ids=["bits", "target_ratio", "source_model"])
def test_an_edited_sidecar_fails_verify(quantized, tmp_path, capsys, change):
    copy = fresh(quantized, tmp_path)
    edit_sidecar(copy, change)
    one_line(capsys, r".", "verify", copy)


def test_a_group_size_that_does_not_divide_the_rows_is_refused_on_load(quantized, tmp_path, capsys):
    copy = fresh(quantized, tmp_path)
    edit_sidecar(copy, lambda meta: meta["groups"][0]["meta"].update(group_size=5))
    one_line(capsys, r"group 'k_proj': group_size 5 does not divide its rows' width 32", "verify", copy)
    with pytest.raises(AECompressError, match=r"group_size 5 does not divide"):
        from aecompress import load_compact

        load_compact(copy)


# --- evaluate --against: each model its own tokenizer, or one line where items must be shared ------


def _shuffled_tokenizer_copy(tiny_lm, directory: Path) -> Path:
    """The tiny Llama's weights beside a tokenizer that numbers the same characters the other way round."""
    shutil.copytree(tiny_lm["model"], directory)
    vocab = list(transformers.AutoTokenizer.from_pretrained(tiny_lm["model"]).get_vocab())
    specials = [t for t in vocab if t.startswith("[")]
    order = specials + sorted((t for t in vocab if t not in specials), reverse=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (directory / name).unlink(missing_ok=True)
    transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(order)}, do_lower_case=True).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("swap", [False, True], ids=["other_against", "other_first"])
def test_against_a_model_with_another_tokenizer_is_refused_for_token_metrics(tiny_lm, tmp_path, capsys, swap):
    other = _shuffled_tokenizer_copy(tiny_lm, tmp_path / "other")
    first, second = (other, tiny_lm["model"]) if swap else (tiny_lm["model"], other)
    code, out, err = run_cli(capsys, "evaluate", "--model", first, "--against", second, "--data",
                             f"{tiny_lm['text']}:all[:600]", "--window", "32")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("aecompress: error: "), (code, err[-2000:])
    assert "tokenizes the data differently" in lines[-1] and "perplexity" in lines[-1]
    assert "model:" not in out  # refused before anything was measured


def test_against_a_model_with_another_tokenizer_measures_sentence_metrics_with_its_own(tiny_lm, tmp_path, capsys):
    other = _shuffled_tokenizer_copy(tiny_lm, tmp_path / "other")
    both, alone = tmp_path / "both.json", tmp_path / "alone.json"
    assert run_cli(capsys, "evaluate", "--model", tiny_lm["model"], "--against", other, "--metrics", "lee_pearson",
                   "--data", "lee", "--json", both)[0] == 0
    assert run_cli(capsys, "evaluate", "--model", other, "--metrics", "lee_pearson", "--data", "lee",
                   "--json", alone)[0] == 0
    assert json.loads(both.read_text())["lee_pearson_against"] == json.loads(alone.read_text())["lee_pearson"]


def test_a_missing_against_directory_is_refused_before_anything_is_measured(tiny_lm, tmp_path, capsys):
    code, out, err = run_cli(capsys, "evaluate", "--model", tiny_lm["model"], "--against", tmp_path / "absent",
                             "--data", f"{tiny_lm['text']}:all[:600]", "--window", "32")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("aecompress: error: --against: "), (code, err[-2000:])
    assert "absent' does not exist" in lines[-1] and out == ""


# --- a peer's manifest is checked against the files its own checkpoint stores -----------------------


@pytest.fixture
def peer(tmp_path) -> tuple[torch.nn.Module, Path]:
    model = build_tiny("llama")
    return model, fake_peer(tmp_path, model, ["k_proj"])


def _peer_form(model, path: Path):
    group = select_groups(model, ["k_proj"])[0]
    return compress("external", group, extract_rows(model, group), None, path=str(path))


def _rewrite(path: Path, change) -> None:
    manifest = path / "aecompress-peer.json"
    data = json.loads(manifest.read_text())
    change(data["stored"])
    manifest.write_text(json.dumps(data))


def test_a_peer_manifest_that_matches_its_native_checkpoint_is_counted(peer):
    model, path = peer
    assert _peer_form(model, path).bytes > 0


@pytest.mark.parametrize("change,pattern", [
    (lambda s: s.update({k: [{"name": "qweight", "shape": [1], "dtype": "int8"}] for k in s}),
     r"says .*k_proj\.weight.* stores qweight int8 \[1\], but .*native.* holds int32 \[\d+, \d+\]"),
    (lambda s: s.update({k: [*v, {"name": "g_idx", "shape": [32], "dtype": "int32"}] for k, v in s.items()}),
     r"native.* holds no 'model\.layers\.0\.self_attn\.k_proj\.g_idx'"),
    (lambda s: s.update({k: [] for k in s}), r"lists no stored tensors for 'model\.layers\.0\.self_attn\.k_proj\.weight'"),
    (lambda s: s.update({k: [{**v[0], "shape": ["eight", 32]}] for k, v in s.items()}),
     r"shape \['eight', 32\], which is not a list of non-negative integers"),
], ids=["one_int8_claimed", "tensor_not_in_native", "no_tensors", "non_numeric_shape"])
def test_a_peer_manifest_that_disagrees_with_its_files_is_one_line(peer, change, pattern):
    model, path = peer
    _rewrite(path, change)
    with pytest.raises(AECompressError, match=pattern):
        _peer_form(model, path)


def test_a_peer_without_its_native_checkpoint_is_refused(peer):
    model, path = peer
    shutil.rmtree(path / "native")
    with pytest.raises(AECompressError, match=r"has no native/ checkpoint"):
        _peer_form(model, path)


# --- fit --ckpt_path on a damaged checkpoint, SIGTERM during export ---------------------------------


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_fit_from_a_damaged_checkpoint_is_one_line(fitted, tmp_path, capsys, damage):
    data = fitted["ckpt"].read_bytes()
    (tmp_path / "bad.ckpt").write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    one_line(capsys, r"cannot read checkpoint '.*bad\.ckpt' safely", "fit", "--config", fitted["cfg"],
             "--ckpt_path", tmp_path / "bad.ckpt", "--trainer.max_epochs", "2")


@pytest.mark.slow
def test_sigterm_during_export_exits_143(fitted, tmp_path):
    out = tmp_path / "out"
    proc = spawn("export", "--config", fitted["cfg"], "--ckpt_path", fitted["ckpt"], "--out_dir", out,
                 "--format", "compact", hold=True)
    wait_for(lambda: any(tmp_path.glob(".out.tmp-*/IN-FLIGHT")), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1] == f"aecompress: terminated by SIGTERM; {str(out)!r} was not written"
    assert not out.exists() and leftovers(tmp_path) == []
