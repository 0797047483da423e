"""Lazy loading reads only the selected tensors; the streaming export equals the in-memory one byte for byte."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import aecompress.formats.lazy as lazy
from aecompress.cli import main
from aecompress.core.errors import AECompressError
from aecompress.core.groups import extract_rows
from aecompress.core.selection import select_groups
from aecompress.formats.decoded import export_decoded
from aecompress.formats.streaming import export_streaming, write_safetensors
from aecompress.training.datamodule import WeightRowsDataModule
from aecompress.training.module import CompressorModule
from tests.conftest import build_tiny, write_config

SHARD = "20KB"  # the tiny Llama (about 100 KB) in 7 shards


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A tiny Llama saved in small shards with an index, as transformers shards a loaded model.

    (``save_pretrained`` orders a freshly built model's tensors differently from a loaded one's,
    so the shards of a checkpoint that has been through ``from_pretrained`` once are the layout
    the in-memory export writes.)
    """
    base = tmp_path_factory.mktemp("sharded")
    build_tiny("llama").save_pretrained(base / "built")
    root = base / "llama"
    transformers.AutoModelForCausalLM.from_pretrained(base / "built").save_pretrained(root, max_shard_size=SHARD)
    assert (root / lazy.INDEX).is_file()
    return root


class _Reads:
    """Wraps safetensors.safe_open to record which tensors' data is read."""

    def __init__(self, monkeypatch, module):
        self.tensors: list[str] = []
        real = module.safe_open
        reads = self

        class Handle:
            def __init__(self, *args, **kwargs):
                self.inner = real(*args, **kwargs)

            def __enter__(self):
                self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_slice(self, name):
                return self.inner.get_slice(name)

            def get_tensor(self, name):
                reads.tensors.append(name)
                return self.inner.get_tensor(name)

        monkeypatch.setattr(module, "safe_open", Handle)


def test_fit_data_reads_only_the_selected_tensors(sharded, monkeypatch):
    reads = _Reads(monkeypatch, lazy)

    def refuse(*args, **kwargs):
        raise AssertionError("the full model must not be loaded")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    dm = WeightRowsDataModule(str(sharded), modules=["k_proj"], ratio=2.0)
    assert sorted(reads.tensors) == [f"model.layers.{i}.self_attn.k_proj.weight" for i in range(2)]
    assert dm.skeleton is not None and dm.tensor_files.sharded
    assert all(p.device.type == "meta" for p in dm.skeleton.parameters())
    monkeypatch.undo()
    full = transformers.AutoModelForCausalLM.from_pretrained(sharded)
    (group,) = select_groups(full, ["k_proj"])
    assert torch.equal(dm.rows["k_proj"], extract_rows(full, group))
    assert dm.groups == [group]


def test_gpt2_conv1d_fused_rows_match_the_full_model(tiny_dirs):
    dm = WeightRowsDataModule(str(tiny_dirs["gpt2"]), modules=["key", "mlp_fc"], ratio=2.0)
    eager = WeightRowsDataModule(str(tiny_dirs["gpt2"]), modules=["key", "mlp_fc"], ratio=2.0, lazy=False)
    assert dm.skeleton is not None and eager.skeleton is None
    assert dm.groups == eager.groups and dm.group_specs == eager.group_specs
    assert all(torch.equal(dm.rows[k], eager.rows[k]) for k in eager.rows)
    assert dm.groups[0].members[0].transposed  # Conv1D found on the meta skeleton


def test_a_missing_shard_is_named(sharded, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    (broken / "model-00003-of-00007.safetensors").unlink()
    with pytest.raises(AECompressError, match=r"model-00003-of-00007.safetensors.* missing"):
        WeightRowsDataModule(str(broken), modules=["k_proj"], ratio=2.0)
    cfg = write_config(tmp_path / "cfg.yaml", broken, ["k_proj"], tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert "model-00003-of-00007.safetensors" in err[-1] and err[-1].startswith("aecompress: error:")


def test_writer_is_byte_identical_to_save_file(tmp_path):
    rng = random.Random(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.int8, torch.float64]
    for trial in range(5):
        tensors = {}
        for i in range(rng.randint(1, 9)):
            shape = tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 3)))
            dtype = rng.choice(dtypes)
            tensors[f"t.{rng.randint(0, 99)}.{i}"] = (torch.randn(shape) * 10).to(dtype)
        save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
        specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
        write_safetensors(tmp_path / "ours.safetensors", specs, {"format": "pt"}, tensors.__getitem__)
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), trial


def _trained_forms(dm: WeightRowsDataModule):
    torch.manual_seed(0)
    module = CompressorModule(dm.group_specs)
    return module.stored_forms(dm.rows)


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("layout,dtype", [("sharded", "float32"), ("single", "float32"), ("single", "bfloat16")])
def test_streaming_export_equals_in_memory_byte_for_byte(sharded, tiny_dirs, tmp_path, layout, dtype):
    source = sharded if layout == "sharded" else tiny_dirs["llama"]
    dm = WeightRowsDataModule(str(source), modules=["k_proj", "up_proj", "embed_tokens"], ratio=2.0)
    forms = _trained_forms(dm)
    export_streaming(dm.skeleton, dm.tensor_files, forms, dm.source, dm.auto_class, "tiny", tmp_path / "stream",
                     dtype=dtype)
    assert dm._hf_model is None, "streaming must not load the full model"
    export_decoded(dm.hf_model, forms, dm.source, dm.auto_class, "tiny", tmp_path / "memory",
                   max_shard_size=SHARD if layout == "sharded" else "50GB", dtype=dtype)
    assert json.loads((tmp_path / "stream" / "config.json").read_text())["dtype"] == dtype
    ours, theirs = _tree(tmp_path / "stream"), _tree(tmp_path / "memory")
    # The model cards differ only where they name their own directory.
    ours["README.md"] = ours["README.md"].replace(b'"stream"', b'"memory"').replace(b"--model stream", b"--model memory")
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k] != theirs[k]] == []
    if layout == "sharded":
        assert json.loads(ours[lazy.INDEX])["weight_map"] == json.loads((source / lazy.INDEX).read_text())["weight_map"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    changed = {k for k, v in original.state_dict().items() if not torch.equal(v, reloaded.state_dict()[k])}
    assert "model.layers.1.self_attn.k_proj.weight" in changed and "model.norm.weight" not in changed


def test_export_command_streams_a_lazy_run(sharded, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", sharded, ["k_proj"], tmp_path)
    main(["fit", "--config", str(cfg)])
    ckpt = str(tmp_path / "ckpt" / "best.ckpt")
    main(["export", "--config", str(cfg), "--ckpt_path", ckpt, "--out_dir", str(tmp_path / "auto")])
    main(["export", "--config", str(cfg), "--ckpt_path", ckpt, "--out_dir", str(tmp_path / "whole"), "--stream", "false"])
    streamed = sorted(p.name for p in (tmp_path / "auto").iterdir())
    assert lazy.INDEX in streamed and "model-00007-of-00007.safetensors" in streamed
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "auto").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stream_is_refused_where_it_cannot_work(sharded, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", sharded, ["k_proj"], tmp_path, **{"data.lazy": False})
    main(["fit", "--config", str(cfg)])
    ckpt = str(tmp_path / "ckpt" / "best.ckpt")
    for extra, message in ((["--stream"], "needs the rows read lazily"),
                           (["--stream", "--format", "compact", "--data.lazy", "true"], "decoded format only")):
        with pytest.raises(SystemExit):
            main(["export", "--config", str(cfg), "--ckpt_path", ckpt, "--out_dir", str(tmp_path / "x"), *extra])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
