"""The fault matrix: every fault gives one clear error or recovers, and leaves existing outputs intact.

Each test's docstring names the matrix row it covers (issue 6). Processes that are
killed run the real entry point (``python -m aecompress``) in a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file, save_file

import aecompress
from aecompress import load_compact
from aecompress.cli import main
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.files import atomic_directory, sha256
from aecompress.core.groups import extract_rows
from aecompress.core.selection import select_groups
from aecompress.core.stored import StoredForm
from aecompress.formats.export import export
from aecompress.formats.sidecar import COMPRESSED, REMAINING, SIDECAR
from aecompress.formats.sources import load_model
from aecompress.formats.verify import check_compact
from aecompress.methods import compress, decode
from aecompress.training.datamodule import WeightRowsDataModule
from aecompress.training.module import CompressorModule
from tests.conftest import build_tiny, run_cli, write_config

AUTO = {"bert": "AutoModel", "gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM"}
MODULES = {"bert": ["key", "value"], "gpt2": ["key", "mlp_fc"], "llama": ["k_proj", "up_proj"]}
REPO = Path(__file__).resolve().parents[1]


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run the real entry point in-process; return the exit code and the last line of stderr."""
    code, _, err = run_cli(capsys, *args)
    lines = err.strip().splitlines()
    return code, lines[-1] if lines else ""


def one_error(capsys, pattern: str, *args: str) -> str:
    """The command fails with exit 2 and one ``aecompress: error:`` line matching ``pattern``."""
    code, line = cli(capsys, *args)
    assert code == 2, (code, line)
    assert line.startswith("aecompress: error: ") and re.search(pattern, line), line
    return line


def tree(path: Path) -> dict[str, bytes]:
    """Every file under a directory (hidden ones included) with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temporary or displaced export directories next to a target."""
    return sorted(p.name for p in parent.iterdir() if re.match(r"\..*\.(tmp|old)-", p.name))


# --- shared artifacts ----------------------------------------------------------------------------


def fit_config(workdir: Path, model_dir: Path, **overrides) -> Path:
    """A one-epoch fit config that also keeps ``last.ckpt``."""
    cfg = write_config(workdir / "cfg.yaml", model_dir, ["key"], workdir, **overrides)
    import yaml

    data = yaml.safe_load(cfg.read_text())
    for cb in data["trainer"]["callbacks"]:
        cb["init_args"]["save_last"] = True
    cfg.write_text(yaml.safe_dump(data))
    return cfg


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_dirs) -> dict[str, Path]:
    """A tiny BERT fitted once through the CLI: its config, best checkpoint and a reference compact export."""
    work = tmp_path_factory.mktemp("fitted")
    cfg = fit_config(work, tiny_dirs["bert"])
    main(["fit", "--config", str(cfg)])
    ckpt = work / "ckpt" / "best.ckpt"
    main(["export", "--config", str(cfg), "--ckpt_path", str(ckpt), "--out_dir", str(work / "reference"),
          "--format", "compact"])
    return {"cfg": cfg, "ckpt": ckpt, "reference": work / "reference", "work": work}


def svd_compact(model: torch.nn.Module, family: str, source: Path, out: Path, modules: list[str]) -> Path:
    """A compact export of ``model`` with SVD forms (no training needed)."""
    forms = {g.name: compress("svd", g, extract_rows(model, g), Budget.of_ratio(4.0)) for g in select_groups(model, modules)}
    export(model, forms, str(source), AUTO[family], "tiny", str(out), "compact")
    return out


@pytest.fixture(scope="module")
def compacts(tmp_path_factory, tiny_dirs) -> dict[str, Path]:
    """Compact exports of two different tiny BERTs (same architecture), a tiny Llama, and an autoencoder."""
    root = tmp_path_factory.mktemp("compacts")
    out = {
        "bert": svd_compact(build_tiny("bert", seed=0), "bert", tiny_dirs["bert"], root / "bert", ["key", "value"]),
        "bert_other": svd_compact(build_tiny("bert", seed=1), "bert", tiny_dirs["bert"], root / "bert1", ["key", "value"]),
        "llama": svd_compact(build_tiny("llama"), "llama", tiny_dirs["llama"], root / "llama", ["k_proj"]),
    }
    data = WeightRowsDataModule(model=str(tiny_dirs["bert"]), modules=["key"], ratio=4.0)
    module = CompressorModule(groups=data.group_specs)
    export(data.hf_model, module.stored_forms(data.rows), data.source, data.auto_class, data.model_name,
           str(root / "ae"), "compact")
    out["ae"] = root / "ae"
    return out


def fresh(src: Path, tmp_path: Path, name: str = "artifact") -> Path:
    """A private copy of a shared artifact, for a test to damage."""
    return Path(shutil.copytree(src, tmp_path / name))


def rewrite_compressed(directory: Path, change) -> None:
    """Change compressed.safetensors and record its new checksum, as a careless tool would."""
    tensors = load_file(directory / COMPRESSED)
    change(tensors)
    save_file(tensors, directory / COMPRESSED)
    meta = json.loads((directory / SIDECAR).read_text())
    meta["checksums"][COMPRESSED] = sha256(directory / COMPRESSED)
    (directory / SIDECAR).write_text(json.dumps(meta))


def edit_sidecar(directory: Path, change) -> None:
    meta = json.loads((directory / SIDECAR).read_text())
    change(meta)
    (directory / SIDECAR).write_text(json.dumps(meta))


# --- row: model directory missing, empty, or missing config.json -----------------------------------


@pytest.mark.parametrize("case,pattern", [
    ("missing", r"model path '.*/absent' does not exist"),
    ("empty", r"model directory '.*/model' has no config\.json"),
    ("no_config", r"model directory '.*/model' has no config\.json"),
    ("bad_config", r"config\.json"),
    ("no_weights", r"could not load model '.*/model'"),
])
def test_model_directory_faults_name_the_path(tmp_path, tiny_dirs, capsys, case, pattern):
    """Row: model directory missing, empty, or missing ``config.json`` -> error naming the path and what is missing."""
    model = tmp_path / "model"
    if case == "missing":
        model = tmp_path / "absent"
    elif case == "empty":
        model.mkdir()
    else:
        shutil.copytree(tiny_dirs["bert"], model)
        if case == "no_config":
            (model / "config.json").unlink()
        elif case == "bad_config":
            (model / "config.json").write_text("{not json")
        else:
            (model / "model.safetensors").unlink()
    cfg = fit_config(tmp_path, model)
    one_error(capsys, pattern, "fit", "--config", cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cfg.yaml"] + (["model"] if case != "missing" else []))


# --- row: truncated or corrupted model.safetensors, a shard index naming a missing file --------------


def _truncate(model: Path) -> str:
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "model.safetensors"


def _corrupt_header(model: Path) -> str:
    path = model / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:24] = b"#" * 16
    path.write_bytes(bytes(data))
    return "model.safetensors"


def _empty(model: Path) -> str:
    (model / "model.safetensors").write_bytes(b"")
    return "model.safetensors"


def _missing_shard(model: Path) -> str:
    transformers.AutoModel.from_pretrained(model).save_pretrained(model, max_shard_size=50_000)
    (model / "model.safetensors").unlink(missing_ok=True)
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    return shards[-1].name


@pytest.mark.parametrize("damage", [_truncate, _corrupt_header, _empty, _missing_shard])
def test_damaged_weights_are_named_and_nothing_is_written(tmp_path, tiny_dirs, capsys, damage):
    """Row: truncated or corrupted ``model.safetensors``, and a sharded index naming a missing file.

    Expected: an error naming the file; nothing written.
    """
    model = Path(shutil.copytree(tiny_dirs["bert"], tmp_path / "model"))
    name = damage(model)
    with pytest.raises(AECompressError, match=re.escape(name)):
        load_model(str(model))
    cfg = fit_config(tmp_path, model)
    before = tree(tmp_path)
    one_error(capsys, rf"'.*/model/{re.escape(name)}' are (missing|truncated or corrupted)", "fit", "--config", cfg)
    assert tree(tmp_path) == before


# --- row: compact artifact with a tampered tensor, a missing tensor, a wrong shape, another model's sidecar --


def _flip_byte(name):
    def damage(d: Path, compacts) -> None:
        data = bytearray((d / name).read_bytes())
        data[-3] ^= 0x5A
        (d / name).write_bytes(bytes(data))
    return damage


def _drop_tensor(d: Path, compacts) -> None:
    rewrite_compressed(d, lambda t: t.pop("key/A"))


def _reshape_tensor(d: Path, compacts) -> None:
    rewrite_compressed(d, lambda t: t.update({"key/A": t["key/A"][:, :-1].contiguous()}))


def _recast_tensor(d: Path, compacts) -> None:
    rewrite_compressed(d, lambda t: t.update({"key/A": t["key/A"].half()}))


def _other_models_sidecar(d: Path, compacts) -> None:
    shutil.copy(compacts["bert_other"] / SIDECAR, d / SIDECAR)


def _other_architecture(d: Path, compacts) -> None:
    for name in (COMPRESSED, REMAINING, SIDECAR):
        shutil.copy(compacts["llama"] / name, d / name)


def _other_group_size(d: Path, compacts) -> None:
    def change(meta):
        meta["groups"][0]["group"]["members"] = meta["groups"][0]["group"]["members"][:1]
    edit_sidecar(d, change)


def _missing_file(d: Path, compacts) -> None:
    (d / REMAINING).unlink()


def _no_checksums(d: Path, compacts) -> None:
    edit_sidecar(d, lambda meta: meta.pop("checksums"))


def _damaged_sidecar(d: Path, compacts) -> None:
    (d / SIDECAR).write_text('{"format": "aecompress-compact", ')


@pytest.mark.parametrize("damage,pattern", [
    (_flip_byte(COMPRESSED), r"checksum mismatch for '.*compressed\.safetensors'"),
    (_flip_byte(REMAINING), r"checksum mismatch for '.*remaining\.safetensors'"),
    (_drop_tensor, r"missing tensor 'key/A'"),
    (_reshape_tensor, r"tensor 'key/A' has shape \[64, \d+\], sidecar says \[64, \d+\]"),
    (_recast_tensor, r"tensor 'key/A' has dtype float16, sidecar says float32"),
    (_other_models_sidecar, r"checksum mismatch for '.*compressed\.safetensors'"),
    (_other_architecture, r"holds '[\w.]+', which this architecture does not have"),
    (_other_group_size, r"group 'key' is 64 x 32 in aecompress\.json, but its matrices in this model are \[\(32, 32\)\]"),
    (_missing_file, r"is missing remaining\.safetensors"),
    (_no_checksums, r"'checksums' is missing"),
    (_damaged_sidecar, r"cannot read '.*aecompress\.json'"),
], ids=["tampered_tensor", "tampered_remaining", "missing_tensor", "wrong_shape", "wrong_dtype", "other_models_sidecar",
        "other_architecture", "group_size", "missing_file", "no_checksums", "damaged_sidecar"])
def test_damaged_compact_artifact_is_refused(tmp_path, compacts, damage, pattern):
    """Row: compact artifact with a tampered tensor, a missing tensor, a wrong shape, or another model's sidecar.

    Expected: refused on load (and by ``verify``), naming the mismatch; the sidecar's
    content checksums are verified before any tensor is used.
    """
    d = fresh(compacts["bert"], tmp_path)
    load_compact(d)  # whole before the damage
    damage(d, compacts)
    with pytest.raises(AECompressError, match=pattern):
        load_compact(d)
    with pytest.raises(AECompressError, match=pattern):
        check_compact(d)


# --- row: a sidecar that asks for an unknown method or decoder class: refused, nothing imported ---------

PROBE = "aecompress_probe_payload"


@pytest.fixture
def payload(tmp_path, monkeypatch) -> Path:
    """An importable module that leaves a marker file if anything ever imports or runs it."""
    marker = tmp_path / "payload-ran"
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\nclass Evil:\n    pass\n"
    (tmp_path / "payload").mkdir()
    (tmp_path / "payload" / f"{PROBE}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path / "payload"))
    monkeypatch.delitem(sys.modules, PROBE, raising=False)
    return marker


def _set_method(meta):
    meta["groups"][0]["method"] = f"{PROBE}.Evil"


def _set_auto_class(meta):
    meta["auto_class"] = f"{PROBE}.Evil"


def _set_decoder(meta):
    meta["groups"][0]["meta"]["spec"]["decoder"] = f"{PROBE}.Evil"


def _set_activation(meta):
    meta["groups"][0]["meta"]["spec"]["out_activation"] = f"{PROBE}.Evil"


@pytest.mark.parametrize("change,pattern", [
    (_set_method, r"unknown method 'aecompress_probe_payload\.Evil'; valid: svd, fwsvd, whitened_svd, prune, quantize"),
    (_set_auto_class, r"unknown model class 'aecompress_probe_payload\.Evil'; valid: AutoModel, "),
    (_set_decoder, r"unknown autoencoder decoder 'aecompress_probe_payload\.Evil'; valid: mlp, linear, residual"),
    (_set_activation, r"unknown autoencoder out_activation 'aecompress_probe_payload\.Evil'; valid: tanh, none"),
], ids=["method", "auto_class", "decoder", "out_activation"])
def test_sidecar_cannot_make_us_import_code(tmp_path, compacts, payload, change, pattern):
    """Row: compact artifact whose sidecar asks for an unknown method or decoder class.

    Expected: refused, listing the valid names; nothing named by the artifact is imported.
    """
    d = fresh(compacts["ae"], tmp_path)
    edit_sidecar(d, change)
    for load in (load_compact, check_compact):
        with pytest.raises(AECompressError, match=pattern):
            load(d)
    assert not payload.exists() and PROBE not in sys.modules


# --- row: torch.load of a user-given .ckpt ----------------------------------------------------------


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("command", ["export", "fit", "validate"])
def test_checkpoints_are_never_unpickled(tmp_path, tiny_dirs, fitted, capsys, monkeypatch, command):
    """Row: ``torch.load`` of a user-given ``.ckpt`` -> ``weights_only=True`` always; never arbitrary unpickling."""
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.ckpt"
    good = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)
    torch.save({**good, "hyper_parameters": {"x": _Payload(marker)}}, evil)
    # torch's default would allow unpickling here; aecompress must not rely on the default.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    own = fit_config(tmp_path, tiny_dirs["bert"], **{"trainer.max_epochs": 2})  # writes stay under tmp_path
    args = ["--config", fitted["cfg"] if command == "export" else own, "--ckpt_path", evil]
    if command == "export":
        args += ["--out_dir", tmp_path / "out"]
    refused = r"checkpoint refused: it holds more than tensors|cannot read checkpoint '.*evil\.ckpt' safely"
    one_error(capsys, refused, command, *args)
    assert not marker.exists() and not (tmp_path / "out").exists()
    if command != "export":
        good_args = [a if a != evil else fitted["ckpt"] for a in args]
        one_error(capsys, r"--weights_only false is refused", command, *good_args, "--weights_only", "false")
    torch.load(evil, weights_only=False)  # the payload is live: plain unpickling would have run it
    assert marker.exists()


def test_checkpoint_hyperparameters_cannot_name_code(tmp_path, tiny_dirs, fitted, capsys, payload):
    """Row: a user-given ``.ckpt`` -> its ``hyper_parameters`` never configure the run (a class path there is not imported)."""
    ckpt = tmp_path / "hp.ckpt"
    good = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)
    torch.save({**good, "hyper_parameters": {"optimizer": {"class_path": f"{PROBE}.Evil"}}}, ckpt)
    cfg = fit_config(tmp_path, tiny_dirs["bert"], **{"trainer.max_epochs": 2})
    code, _ = cli(capsys, "fit", "--config", cfg, "--ckpt_path", ckpt)
    assert code == 0
    assert not payload.exists() and PROBE not in sys.modules


# --- row: trust_remote_code -------------------------------------------------------------------------


def test_remote_code_is_off_unless_the_flag_is_given(tmp_path, tiny_dirs, compacts, payload, capsys):
    """Row: ``trust_remote_code`` -> never on by default; a flag a user must pass explicitly."""
    import inspect

    assert inspect.signature(WeightRowsDataModule).parameters["trust_remote_code"].default is False
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    assert "trust_remote_code" not in inspect.signature(load_compact).parameters
    cfg = fit_config(tmp_path, tiny_dirs["bert"])
    code, _ = cli(capsys, "fit", "--config", cfg, "--print_config")
    assert code == 0  # --print_config exits 0 after printing
    # A checkpoint that ships code: auto_map points at a module next to config.json.
    model = Path(shutil.copytree(tiny_dirs["bert"], tmp_path / "model"))
    shutil.copy(payload.parent / "payload" / f"{PROBE}.py", model / f"{PROBE}.py")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="probe-remote", auto_map={"AutoConfig": f"{PROBE}.Evil", "AutoModel": f"{PROBE}.Evil"})
    (model / "config.json").write_text(json.dumps(config))
    cfg = fit_config(tmp_path, model)
    one_error(capsys, r"model '.*/model'", "fit", "--config", cfg)
    compact = fresh(compacts["bert"], tmp_path, "compact")
    shutil.copy(model / "config.json", compact / "config.json")
    shutil.copy(model / f"{PROBE}.py", compact / f"{PROBE}.py")
    with pytest.raises(AECompressError, match="config.json"):
        load_compact(compact)
    assert not payload.exists() and PROBE not in sys.modules


# --- row: zero-norm rows, NaN or inf in the source weights ------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_source_weights_are_reported(tmp_path, tiny_dirs, capsys, value):
    """Row: NaN or inf in the source weights -> detected and reported (group and row named)."""
    model = build_tiny("bert")
    with torch.no_grad():
        model.encoder.layer[1].attention.self.key.weight[5, 3] = value
    model.save_pretrained(tmp_path / "model")
    cfg = fit_config(tmp_path, tmp_path / "model")
    one_error(capsys, r"group 'key' has 1 rows with NaN or inf .*first row index 37", "fit", "--config", cfg)
    assert not (tmp_path / "ckpt").exists()
    (group,) = select_groups(model, ["key"])
    with pytest.raises(AECompressError, match="group 'key' holds NaN or inf"):
        compress("svd", group, extract_rows(model, group), Budget.of_ratio(4.0))


def test_zero_norm_rows_compress_to_finite_weights(tmp_path, capsys):
    """Row: weight rows with zero norm -> handled without NaN output (autoencoder fit + export, and every baseline)."""
    model = build_tiny("bert")
    with torch.no_grad():
        model.encoder.layer[0].attention.self.key.weight[:4] = 0
        model.encoder.layer[1].attention.self.key.weight.zero_()
    model.save_pretrained(tmp_path / "model")
    cfg = fit_config(tmp_path, tmp_path / "model")
    assert cli(capsys, "fit", "--config", cfg)[0] == 0
    ckpt = tmp_path / "ckpt" / "best.ckpt"
    for fmt in ("decoded", "compact"):
        assert cli(capsys, "export", "--config", cfg, "--ckpt_path", ckpt, "--out_dir", tmp_path / fmt, "--format", fmt)[0] == 0
    loaded = [transformers.AutoModel.from_pretrained(tmp_path / "decoded"), load_compact(tmp_path / "compact")]
    for m in loaded:
        assert all(torch.isfinite(t).all() for t in m.state_dict().values())
        assert torch.count_nonzero(m.encoder.layer[1].attention.self.key.weight) == 0
    (group,) = select_groups(model, ["key"])
    rows = extract_rows(model, group)
    for method in ("svd", "prune", "quantize"):
        assert torch.isfinite(decode(compress(method, group, rows, Budget.of_ratio(4.0)))).all()


# --- row: NaN or inf loss during fit ----------------------------------------------------------------


class PoisonAtEpoch(Callback):
    """Test only: turn a decoder weight into NaN when ``epoch`` starts, so the loss goes non-finite."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                next(pl_module.aes.parameters()).fill_(float("nan"))


def test_nan_loss_stops_naming_group_and_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_dirs, capsys):
    """Row: NaN or inf loss during fit -> stop with a message naming group and step; the last good checkpoint is kept."""
    import yaml

    cfg = fit_config(tmp_path, tiny_dirs["bert"], **{"trainer.max_epochs": 3})
    data = yaml.safe_load(cfg.read_text())
    data["trainer"]["callbacks"].append({"class_path": "tests.test_faults.PoisonAtEpoch", "init_args": {"epoch": 1}})
    cfg.write_text(yaml.safe_dump(data))
    one_error(capsys, r"non-finite loss \(nan\) in group 'key' at step 4;", "fit", "--config", cfg)
    for name in ("best.ckpt", "last.ckpt"):  # 64 rows in batches of 16: epoch 0 ends at step 4
        ckpt = torch.load(tmp_path / "ckpt" / name, map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == 0 and ckpt["global_step"] == 4
        assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    out = tmp_path / "out"
    assert cli(capsys, "export", "--config", cfg, "--ckpt_path", tmp_path / "ckpt" / "last.ckpt", "--out_dir", out,
               "--format", "compact")[0] == 0
    assert all(torch.isfinite(t).all() for t in load_compact(out).state_dict().values())


# --- rows: SIGTERM or SIGKILL during export, SIGTERM during fit ----------------------------------------

# Runs the real entry point with one change: the final rename of an export's temporary
# directory first waits, so that a signal is certain to land while the export is in flight.
_HOLD_BEFORE_RENAME = """
import os, sys, time
from pathlib import Path
rename = os.rename
def held(src, dst, *args, **kwargs):
    if ".tmp-" in Path(src).name:
        (Path(src) / "IN-FLIGHT").write_text("")
        time.sleep(120)
    return rename(src, dst, *args, **kwargs)
os.rename = held
from aecompress.cli import main
main(sys.argv[1:])
"""


def spawn(*args, hold: bool = False) -> subprocess.Popen:
    code = ["-c", _HOLD_BEFORE_RENAME] if hold else ["-m", "aecompress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, *code, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def assert_complete_or_absent(out: Path, reference: Path) -> bool:
    """The target is absent, or a complete export equal to the reference; True if complete."""
    if not out.exists():
        return False
    a, b = load_compact(out).state_dict(), load_compact(reference).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_export_leaves_the_target_absent_or_complete(tmp_path, fitted, capsys, sig):
    """Row: SIGTERM or SIGKILL during export -> the target directory is either absent or complete, never partial."""
    out = tmp_path / "out"
    proc = spawn("export", "--config", fitted["cfg"], "--ckpt_path", fitted["ckpt"], "--out_dir", out,
                 "--format", "compact", hold=True)
    wait_for(lambda: any(tmp_path.glob(".out.tmp-*/IN-FLIGHT")), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not assert_complete_or_absent(out, fitted["reference"])
    if sig == signal.SIGTERM:  # cleaned up, with one line saying so
        assert leftovers(tmp_path) == []
        assert err.strip().splitlines()[-1] == f"aecompress: terminated by SIGTERM; {str(out)!r} was not written"
    # A rerun is not disturbed by what a SIGKILL left behind, and writes the complete export.
    assert cli(capsys, "export", "--config", fitted["cfg"], "--ckpt_path", fitted["ckpt"], "--out_dir", out,
               "--format", "compact")[0] == 0
    assert assert_complete_or_absent(out, fitted["reference"])


@pytest.mark.slow
def test_sigterm_during_fit_keeps_a_usable_checkpoint_and_resumes(tmp_path, tiny_dirs, capsys):
    """Row: SIGTERM during fit -> the last checkpoint is usable; ``--ckpt_path last`` resumes."""
    cfg = fit_config(tmp_path, tiny_dirs["bert"], **{"trainer.max_epochs": 10_000})
    last = tmp_path / "ckpt" / "last.ckpt"
    proc = spawn("fit", "--config", cfg)
    wait_for(last.is_file, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err.strip().splitlines()[-1]
    saved = torch.load(last, map_location="cpu", weights_only=True)
    epoch, step = saved["epoch"], saved["global_step"]
    assert epoch < 10_000 - 1
    code, _ = cli(capsys, "fit", "--config", cfg, "--ckpt_path", "last", "--trainer.max_epochs", str(epoch + 3))
    assert code == 0
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["epoch"] == epoch + 2 and resumed["global_step"] == step + 2 * 4  # 64 rows / 16 a batch


# --- row: two exports racing to the same --out_dir ------------------------------------------------------


@pytest.mark.slow
def test_racing_exports_one_wins_cleanly(tmp_path, fitted):
    """Row: two exports racing to the same ``--out_dir`` -> one wins cleanly; the other errors; neither corrupts."""
    out = tmp_path / "out"
    args = ("export", "--config", fitted["cfg"], "--ckpt_path", fitted["ckpt"], "--out_dir", out, "--format", "compact")
    procs = [spawn(*args), spawn(*args)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    last_line = loser.strip().splitlines()[-1]
    assert re.search(r"aecompress: error: output directory '.*/out' (exists|appeared while writing)", last_line)
    assert assert_complete_or_absent(out, fitted["reference"]) and leftovers(tmp_path) == []


def test_racing_writers_in_flight_one_wins(tmp_path):
    """Row: two exports racing to the same ``--out_dir``, both past the existence check -> the second commit errors."""
    target = tmp_path / "out"
    first, second = atomic_directory(target), atomic_directory(target)
    a, b = first.__enter__(), second.__enter__()
    (a / "who").write_text("first")
    (b / "who").write_text("second")
    first.__exit__(None, None, None)
    with pytest.raises(AECompressError, match="appeared while writing"):
        second.__exit__(None, None, None)
    assert (target / "who").read_text() == "first" and leftovers(tmp_path) == []


# --- row: disk full while writing ---------------------------------------------------------------------


def test_disk_full_gives_one_error_and_removes_temporary_files(tmp_path, fitted, capsys, monkeypatch):
    """Row: disk full while writing (an injected ``OSError(ENOSPC)``) -> clear error; partial temporary files removed."""
    import aecompress.formats.compact as export_module

    real = export_module.save_file

    def full(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # what got written before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(export_module, "save_file", full)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("an earlier export")
    (existing / "aecompress.json").write_text("{}")  # --overwrite replaces only an export
    for out, extra in ((tmp_path / "out", []), (existing, ["--overwrite"])):
        one_error(capsys, rf"writing '{re.escape(str(out))}' failed, nothing was written: \[Errno 28\] No space left",
                  "export", "--config", fitted["cfg"], "--ckpt_path", fitted["ckpt"], "--out_dir", out,
                  "--format", "compact", *extra)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert (existing / "keep").read_text() == "an earlier export"


@pytest.mark.parametrize("fmt", ["decoded", "compact"])
def test_file_size_limit_fails_the_write_cleanly(tmp_path, fitted, capsys, fmt):
    """Row: disk full while writing (a real failing write: ``RLIMIT_FSIZE``) -> clear error; partial temporary files removed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, hard))
    try:
        code, line = cli(capsys, "export", "--config", fitted["cfg"], "--ckpt_path", fitted["ckpt"],
                         "--out_dir", tmp_path / "out", "--format", fmt)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert code == 2, line
    assert re.match(r"aecompress: error: writing '.*/out' failed, nothing was written: .*File too large", line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- row: unknown config keys, wrong types, a negative or zero ratio, latent dims below 1 ----------------


@pytest.mark.parametrize("args,pattern", [
    (["--data.ration", "3"], r"data\.ration|ration"),
    (["--data.ratio", "ten"], r"data\.ratio"),
    (["--trainer.max_epochs", "many"], r"max_epochs"),
    (["--data.modules", "key"], r"data\.modules"),
    (["--data.ratio", "-2"], r"data\.ratio must be greater than 1, got -2"),
    (["--data.ratio", "0"], r"data\.ratio must be greater than 1, got 0"),
    (["--model.latent_width", "0"], r"model\.latent_width must be positive, got 0"),
    (["--model.decoder_widths", "[2.0, -1.0]"], r"model\.decoder_widths must be positive, got \(2\.0, -1\.0\)"),
    (["--model.encoder_widths", "[0.0]"], r"model\.encoder_widths must be positive"),
    (["--data.batch_size", "-1"], r"data\.batch_size must be >= 0"),
    (["--model.decoder", "transformer"], r"model\.decoder|decoder"),
])
def test_bad_config_values_are_refused_naming_the_key(tmp_path, tiny_dirs, capsys, args, pattern):
    """Row: unknown config keys, wrong types, a negative or zero ratio, latent dims below 1.

    Expected: refused by the parser or validation (exit 2), naming the key.
    """
    cfg = fit_config(tmp_path, tiny_dirs["bert"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(cfg), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert not (tmp_path / "ckpt").exists()


# --- row: export then reload is bit-exact -------------------------------------------------------------


@pytest.mark.parametrize("family", list(MODULES))
def test_autoencoder_export_then_reload_is_bit_exact(tmp_path, tiny_dirs, family):
    """Row: export then reload -> bit-exact for the autoencoder in both formats (baselines: tests/test_baselines.py)."""
    data = WeightRowsDataModule(model=str(tiny_dirs[family]), modules=MODULES[family], ratio=4.0)
    forms = CompressorModule(groups=data.group_specs, encoder="free").stored_forms(data.rows)
    for fmt in ("decoded", "compact"):
        export(data.hf_model, forms, data.source, data.auto_class, data.model_name, str(tmp_path / fmt), fmt)
    decoded = getattr(transformers, AUTO[family]).from_pretrained(tmp_path / "decoded").eval()
    compact = aecompress.load_compact(tmp_path / "compact")
    for form in forms.values():
        rows = decode(form)
        assert torch.equal(extract_rows(decoded, form.group), rows)
        assert torch.equal(extract_rows(compact, form.group), rows)
    a, b = decoded.state_dict(), compact.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _unaligned(tensor: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``tensor`` at ``offset`` bytes into a fresh buffer: memory as a file read may leave it."""
    buffer = bytearray(tensor.numel() * tensor.element_size() + 64)
    out = torch.frombuffer(buffer, dtype=tensor.dtype, offset=offset, count=tensor.numel()).view(tensor.shape)
    return out.copy_(tensor)


@pytest.mark.parametrize("method", ["ae", "svd"])
def test_decoding_does_not_depend_on_memory_alignment(method):
    """Row: export then reload is bit-exact, even when the reloaded tensors sit at unaligned addresses.

    Found by ``test_properties.py::test_compact_equals_decoded``: CPU matmul kernels rounded
    differently on tensors read from a safetensors file, so a compact export differed from
    the decoded one by one ulp. ``decode`` now works on fresh, aligned copies.
    """
    torch.manual_seed(0)
    model = build_tiny("bert")
    (group,) = select_groups(model, ["intermediate"])
    rows = extract_rows(model, group)
    if method == "ae":
        module = CompressorModule(groups=[{**group.to_dict(), "ratio": 2.0}], encoder="free")
        (form,) = module.stored_forms({group.name: rows}).values()
    else:
        form = compress("svd", group, rows, Budget.of_ratio(2.0))
    reference = decode(form)
    for offset in range(4, 64, 4):
        moved = StoredForm(form.method, form.group, {k: _unaligned(t, offset) for k, t in form.tensors.items()}, form.meta)
        assert torch.equal(decode(moved), reference), offset


# --- aecompress verify DIR ----------------------------------------------------------------------------


def test_verify_reports_the_ratio_and_exits_zero_only_when_valid(tmp_path, compacts, capsys):
    """``aecompress verify DIR`` checks checksums and shapes, reports the achieved ratio; non-zero exit otherwise."""
    meta = json.loads((compacts["bert"] / SIDECAR).read_text())
    for args in ([compacts["bert"]], ["--directory", compacts["bert"]]):
        capsys.readouterr()
        main(["verify", *map(str, args)])
        out = capsys.readouterr().out.strip().splitlines()
        assert out[-1].startswith(f"ok: {compacts['bert']}: checksums and shapes match; achieved ratio ")
        assert f"{meta['achieved_ratio']:.3f}" in out[-1]
        assert any(line.strip().startswith("key: svd,") for line in out)
    damaged = fresh(compacts["bert"], tmp_path)
    _flip_byte(COMPRESSED)(damaged, compacts)
    one_error(capsys, r"checksum mismatch for '.*compressed\.safetensors'", "verify", damaged)
    one_error(capsys, r"is not a directory", "verify", tmp_path / "absent")
    inflated = fresh(compacts["bert"], tmp_path, "inflated")
    edit_sidecar(inflated, lambda m: m.update(achieved_ratio=m["achieved_ratio"] * 2))
    one_error(capsys, r"the sidecar claims ratio .* but the stored tensors give", "verify", inflated)
    extra = fresh(compacts["bert"], tmp_path, "extra")
    rewrite_compressed(extra, lambda t: t.update({"hidden/payload": torch.zeros(3)}))
    one_error(capsys, r"holds 'hidden/payload', which no group in the sidecar accounts for", "verify", extra)


@pytest.mark.slow
def test_verify_exit_status_from_the_console(tmp_path, compacts, fitted):
    """``aecompress verify DIR`` from a shell: exit 0 for a valid artifact, non-zero otherwise."""
    ok = subprocess.run([sys.executable, "-m", "aecompress", "verify", str(fitted["reference"])],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "achieved ratio" in ok.stdout, ok.stderr[-2000:]
    damaged = fresh(compacts["bert"], tmp_path)
    _drop_tensor(damaged, compacts)
    bad = subprocess.run([sys.executable, "-m", "aecompress", "verify", str(damaged)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("aecompress: error: compact export is missing")
