"""``--format compressed-tensors``: our integer codes in its pack-quantized layout, loaded by plain transformers."""

import json

import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32 as unpack
from conftest import build_tiny, run_cli
from safetensors.torch import load_file

from aecompress import methods
from aecompress.blocks.grids import grid_codes
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import extract_rows
from aecompress.core.selection import select_groups
from aecompress.core.stored import StoredForm
from aecompress.formats.pack_quantized import converted, export_pack_quantized
from aecompress.formats.substitute import decode_all, substituted


def _args(tiny_lm, out, *extra):
    return ["compress", "--model", tiny_lm["model"], "--bits", "3.5", "--calibration", f"{tiny_lm['text']}:all[-2048:]",
            "--calibration_window", "64", "--out_dir", out, *extra]


def _logits(directory, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model, model(ids).logits


def test_compensated_codes_load_in_plain_transformers_with_the_decoded_exports_logits(tiny_lm, tmp_path, capsys, cache):
    options = ["--options", '{"group_size": 16, "fill": false}', "--tune_steps", "3"]
    for fmt in ("decoded", "compressed-tensors"):
        code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / fmt, "--format", fmt, *options))
        assert code == 0, err
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    (decoded, want), (packed, got) = (_logits(tmp_path / f, ids) for f in ("decoded", "compressed-tensors"))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for name, weight in decoded.named_parameters():  # every weight, compressed or not, within float32 rounding
        torch.testing.assert_close(packed.get_parameter(name), weight, rtol=2e-6, atol=1e-7, msg=name)
    config = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    (scheme,) = config["config_groups"].values()
    assert scheme["weights"]["group_size"] == 16 and scheme["weights"]["symmetric"] is False
    assert len(scheme["targets"]) == 14 and "model.layers.1.mlp.down_proj" in scheme["targets"]
    sizes = [json.loads((tmp_path / f / "aecompress.json").read_text()) for f in ("decoded", "compressed-tensors")]
    assert sizes[0]["stored_bytes"] == sizes[1]["stored_bytes"] and sizes[0]["groups"] == sizes[1]["groups"]
    assert "pack-quantized" in (tmp_path / "compressed-tensors" / "README.md").read_text()
    tensors = load_file(tmp_path / "compressed-tensors" / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.weight" not in tensors and "model.embed_tokens.weight" in tensors
    assert tensors["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32


def test_rows_one_bit_wider_are_written_exactly_on_the_wider_width(tiny_lm, tmp_path, capsys, cache):
    """compensated's default (``fill: true``): narrow rows' codes are the same integers one bit wider."""
    for fmt in ("decoded", "compressed-tensors"):
        code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / fmt, "--format", fmt, "--tune_steps", "0"))
        assert code == 0, err
    meta = json.loads((tmp_path / "compressed-tensors" / "aecompress.json").read_text())
    assert any(g["meta"]["wide_rows"] for g in meta["groups"])  # the case this test is for
    widths = {g["weights"]["num_bits"] for g in json.loads((tmp_path / "compressed-tensors" / "config.json")
                                                            .read_text())["quantization_config"]["config_groups"].values()}
    assert widths == {g["meta"]["bits"] + 1 for g in meta["groups"] if g["meta"]["wide_rows"]} | \
        {g["meta"]["bits"] for g in meta["groups"] if not g["meta"]["wide_rows"]}
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    (decoded, want), (packed, got) = (_logits(tmp_path / f, ids) for f in ("decoded", "compressed-tensors"))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for name, weight in decoded.named_parameters():
        torch.testing.assert_close(packed.get_parameter(name), weight, rtol=2e-6, atol=1e-7, msg=name)


def _forms(model, bits, group_size, zeros="int", dtype="float16"):
    forms = {}
    for group in select_groups(model, ["mlp"]):
        rows = extract_rows(model, group)
        forms[group.name] = methods.compress("quantize", group, rows, Budget.of_bits(16), None, code_bits=bits,
                                             group_size=group_size, zeros=zeros, dtype=dtype)
    return forms


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group_size", [None, 16])
def test_every_width_maps_to_the_librarys_integers_exactly_and_loads(bits, group_size, tmp_path):
    model = build_tiny("llama")
    forms = _forms(model, bits, group_size)
    state, compressor = converted(model, forms)
    shift = 2 ** (bits - 1)
    for form in forms.values():
        ours, r0 = grid_codes(form), 0
        for member in form.group.members:
            name = member.param.removesuffix(".weight")
            rows = model.get_parameter(member.param).shape[0]
            codes = unpack(state[f"{name}.weight_packed"], bits, (rows, form.group.width)).int() + shift
            zeros = unpack(state[f"{name}.weight_zero_point"], bits, tuple(ours.zero_codes[r0 : r0 + rows].shape),
                           packed_dim=0).int() + shift
            assert torch.equal(codes, ours.codes[r0 : r0 + rows]) and torch.equal(zeros, ours.zero_codes[r0 : r0 + rows])
            assert torch.equal(state[f"{name}.weight_scale"], ours.scale[r0 : r0 + rows].float())
            r0 += rows
    model.save_pretrained(tmp_path / "src")
    export_pack_quantized(model, forms, str(tmp_path / "src"), "AutoModelForCausalLM", "tiny", str(tmp_path / "ct"))
    _, got = _logits(tmp_path / "ct", ids := torch.arange(24).view(2, 12))  # the first forward decompresses
    with substituted(model, decode_all(forms.values())), torch.no_grad():
        torch.testing.assert_close(got, model(ids).logits, rtol=0, atol=1e-5)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    loaded(ids)
    for form in forms.values():
        mine = methods.decode(form)
        theirs = torch.cat([loaded.get_parameter(m.param).detach() for m in form.group.members])
        torch.testing.assert_close(theirs, mine, rtol=2e-6, atol=1e-7)


def test_float_zeros_on_the_grid_map_exactly_and_others_are_refused():
    model = build_tiny("llama")
    form = next(iter(_forms(model, 3, 16, zeros="int", dtype="float32").values()))
    ints = grid_codes(form)
    on_grid = {k: v for k, v in form.tensors.items() if k != "zero_codes"} | {"zero": -ints.scale * ints.zero_codes}
    mapped = grid_codes(StoredForm(form.method, form.group, on_grid, form.meta))
    assert torch.equal(mapped.codes, ints.codes) and torch.equal(mapped.zero_codes, ints.zero_codes)
    off_grid = next(iter(_forms(model, 3, 16, zeros="float").values()))
    with pytest.raises(AECompressError, match=r"not on its grid \(zeros: float\).*--options '\{zeros: int\}'"):
        converted(model, {off_grid.group.name: off_grid})


def test_forms_the_layout_cannot_hold_are_refused_in_one_line(tiny_lm, tmp_path, capsys, cache):
    for extra, message in ((["--method", "quantize"], "--options '{zeros: int}'"),
                           (["--method", "svd"], "uses method 'svd', which stores no integer codes")):
        code, _, err = run_cli(capsys, *_args(tiny_lm, tmp_path / "no", "--format", "compressed-tensors",
                                              "--tune_steps", "0", *extra))
        lines = [line for line in err.splitlines() if line.startswith("aecompress: error:")]
        assert code != 0 and len(lines) == 1 and message in lines[0], err
        assert not (tmp_path / "no").exists()
    gpt2 = build_tiny("gpt2")
    with pytest.raises(AECompressError, match=r"is not the whole weight of an nn.Linear"):
        converted(gpt2, _forms(gpt2, 4, 16))
