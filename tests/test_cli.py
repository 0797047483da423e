"""fit then export through the real ``aecompress`` entry point."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import aecompress
from aecompress.cli import main
from tests.conftest import write_config

MODULES = {"bert": ["key", "value"], "gpt2": ["key", "mlp_fc"], "llama": ["k_proj", "up_proj"]}
AUTO = {"bert": transformers.AutoModel, "gpt2": transformers.AutoModelForCausalLM,
        "llama": transformers.AutoModelForCausalLM}


def run(*args: str) -> None:
    main(list(args))


def fit_and_export(tmp_path, model_dir, modules, **overrides):
    cfg = write_config(tmp_path / "cfg.yaml", model_dir, modules, tmp_path, **overrides)
    run("fit", "--config", str(cfg))
    ckpt = tmp_path / "ckpt" / "best.ckpt"
    assert ckpt.is_file()
    for fmt in ("decoded", "compact"):
        run("export", "--config", str(cfg), "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / fmt), "--format", fmt)
    return cfg, ckpt


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_fit_export_decoded_equals_compact(tmp_path, tiny_dirs, family):
    fit_and_export(tmp_path, tiny_dirs[family], MODULES[family])
    decoded = AUTO[family].from_pretrained(tmp_path / "decoded")
    compact = aecompress.load_compact(tmp_path / "compact")
    original = AUTO[family].from_pretrained(tiny_dirs[family])
    sd, sc, so = decoded.state_dict(), compact.state_dict(), original.state_dict()
    assert sd.keys() == sc.keys()
    assert all(torch.equal(sd[k], sc[k]) for k in sd)
    changed = {k for k in so if not torch.equal(so[k], sd[k])}
    assert changed, "the export must carry decoded (changed) weights"
    meta = json.loads((tmp_path / "compact" / "aecompress.json").read_text())
    assert meta["achieved_ratio"] >= 4.0
    assert {g["group"]["name"] for g in meta["groups"]} == set(MODULES[family])


def test_compact_bytes_follow_the_ratio(tmp_path, tiny_dirs):
    fit_and_export(tmp_path, tiny_dirs["llama"], ["k_proj"], **{"data.ratio": 2.0})
    meta = json.loads((tmp_path / "compact" / "aecompress.json").read_text())
    original_bytes = 4 * meta["original_numbers"]
    compressed_file = (tmp_path / "compact" / "compressed.safetensors").stat().st_size
    assert meta["stored_bytes"] <= original_bytes / 2
    assert compressed_file < original_bytes / 2 + 4096  # safetensors header overhead only


def test_separated_mode_and_free_latents(tmp_path, tiny_dirs):
    fit_and_export(tmp_path, tiny_dirs["bert"], ["query"],
                   **{"data.mode": "separated", "model.encoder": "free", "model.decoder": "linear"})
    meta = json.loads((tmp_path / "compact" / "aecompress.json").read_text())
    assert [g["group"]["name"] for g in meta["groups"]] == ["query.0", "query.1"]
    aecompress.load_compact(tmp_path / "compact")


def test_existing_out_dir_is_refused_then_overwritten(tmp_path, tiny_dirs, capsys):
    cfg, ckpt = fit_and_export(tmp_path, tiny_dirs["bert"], ["key"])
    marker = tmp_path / "decoded" / "config.json"
    before = marker.read_bytes()
    with pytest.raises(SystemExit) as exc:
        run("export", "--config", str(cfg), "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "decoded"))
    assert exc.value.code != 0
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert marker.read_bytes() == before
    run("export", "--config", str(cfg), "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "decoded"),
        "--overwrite", "true")
    assert not list(tmp_path.glob(".decoded.*"))


def test_checkpoint_of_another_config_is_refused(tmp_path, tiny_dirs, capsys):
    cfg, ckpt = fit_and_export(tmp_path, tiny_dirs["bert"], ["key"])
    other = write_config(tmp_path / "other.yaml", tiny_dirs["bert"], ["key"], tmp_path, **{"data.ratio": 2.0})
    with pytest.raises(SystemExit) as exc:
        run("export", "--config", str(other), "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "x"))
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "was written by another config: target_ratio: checkpoint 4.0, this config 2.0" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data.model", "/no/such/model"], "model path '/no/such/model' does not exist"),
        (["--data.modules", "[nothing]"], "unknown module type 'nothing'"),
        (["--data.modules", "['*.nothing.weight']"], "matches no weights; available"),
        (["--data.ratio", "500"], "infeasible for group 'key'.*feasible ratios are 1 < ratio <="),
        (["--data.ratio", "0"], "greater than 1"),
    ],
)
def test_bad_input_gives_one_clear_error(tmp_path, tiny_dirs, capsys, args, message):
    import re

    cfg = write_config(tmp_path / "cfg.yaml", tiny_dirs["bert"], ["key"], tmp_path)
    with pytest.raises(SystemExit) as exc:
        run("fit", "--config", str(cfg), *args)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, err[-1]), err[-1]
    assert not (tmp_path / "ckpt").exists()


def test_unknown_config_key_is_refused(tmp_path, tiny_dirs, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_dirs["bert"], ["key"], tmp_path)
    cfg.write_text(cfg.read_text().replace("ratio: 4.0", "ratio: 4.0\n  ration: 3"))
    with pytest.raises(SystemExit) as exc:
        run("fit", "--config", str(cfg))
    assert exc.value.code != 0
    assert "ration" in capsys.readouterr().err


def test_console_script_and_module_entry_point():
    script = str(Path(sys.executable).parent / "aecompress")
    for cmd in ([script, "export", "--help"], [sys.executable, "-m", "aecompress", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert "export" in out


def test_half_precision_storage_exports_exactly(tmp_path, tiny_dirs):
    fit_and_export(tmp_path, tiny_dirs["llama"], ["k_proj"],
                   **{"data.ratio": 2.0, "model.encoder": "free", "model.decoder": "linear",
                      "model.out_activation": "none", "model.enforce_norm": False, "model.storage_dtype": "float16"})
    meta = json.loads((tmp_path / "compact" / "aecompress.json").read_text())
    assert {t["dtype"] for g in meta["groups"] for t in g["tensors"].values()} == {"float16"}
    assert meta["achieved_ratio"] >= 2.0 and meta["stored_bytes"] == 2 * meta["stored_numbers"]
    assert meta["format_version"] == 1  # nothing new inside: still readable by older versions
    decoded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "decoded").state_dict()
    compact = aecompress.load_compact(tmp_path / "compact").state_dict()
    assert all(torch.equal(decoded[k], compact[k]) for k in decoded)


@pytest.mark.parametrize("storage,module,ratio", [("int8", "down_proj", 4.0), ("int4", "down_proj", 4.0),
                                                   ("auto", "down_proj", 4.0), ("int8", "up_proj", 2.0)])
def test_integer_latents_export_load_and_run_just_in_time(tmp_path, tiny_dirs, storage, module, ratio):
    cfg, ckpt = fit_and_export(tmp_path, tiny_dirs["llama"], [module],
                               **{"data.ratio": ratio, "model.encoder": "free", "model.decoder": "linear",
                                  "model.out_activation": "none", "model.enforce_norm": False, "model.init": "svd",
                                  "model.storage_dtype": "float16", "model.latent_storage": storage})
    meta = json.loads((tmp_path / "compact" / "aecompress.json").read_text())
    (group,) = meta["groups"]
    spec = torch.load(ckpt, weights_only=True)["aecompress_signature"]["specs"][module]
    chosen = spec["latent_storage"]
    if module == "up_proj":  # 128 rows x 32 at ratio 2: refinement columns past the full rank of 32
        assert spec["latent"] > spec["width"] == 32
    assert group["meta"]["spec"]["latent_storage"] == chosen != "auto"  # export rebuilt the width fit chose
    assert chosen == storage if storage != "auto" else chosen in {f"int{b}" for b in range(3, 9)}
    packed = chosen != "int8"
    assert group["tensors"]["latents"]["dtype"] == ("uint8" if packed else "int8")
    assert group["tensors"]["latents_scales"]["dtype"] == "float16"
    # An export says the oldest format that holds its codes: older readers refuse it, not misread it.
    assert meta["format_version"] == (3 if packed else 2) and meta["achieved_ratio"] >= ratio
    decoded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "decoded").state_dict()
    compact = aecompress.load_compact(tmp_path / "compact").state_dict()
    assert all(torch.equal(decoded[k], compact[k]) for k in decoded)
    from aecompress.runtime.load import load_runtime

    runtime = load_runtime(tmp_path / "compact")
    ids = torch.arange(1, 17).unsqueeze(0)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "decoded").eval()
    with torch.no_grad():
        torch.testing.assert_close(runtime(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
