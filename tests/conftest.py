"""Tiny random models of real transformers classes, saved as local checkpoints."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = dict(hidden=32, layers=2, heads=2, inter=64, vocab=96)


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """A 2-layer, hidden-32 config of a real architecture."""
    if family == "bert":
        return transformers.BertConfig(
            vocab_size=TINY["vocab"], hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
            num_attention_heads=TINY["heads"], intermediate_size=TINY["inter"], max_position_embeddings=64,
            architectures=["BertModel"],
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=TINY["vocab"], n_embd=TINY["hidden"], n_layer=TINY["layers"], n_head=TINY["heads"],
            n_positions=64, architectures=["GPT2LMHeadModel"],
        )
    if family == "llama":
        return transformers.LlamaConfig(
            vocab_size=TINY["vocab"], hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
            num_attention_heads=TINY["heads"], num_key_value_heads=1, intermediate_size=TINY["inter"],
            max_position_embeddings=64, architectures=["LlamaForCausalLM"],
        )
    raise ValueError(family)


def build_tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model with the head its config names."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    cls = {"bert": transformers.BertModel, "gpt2": transformers.GPT2LMHeadModel,
           "llama": transformers.LlamaForCausalLM}[family]
    return cls(config).eval()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Local checkpoints of tiny BERT, GPT-2 and Llama models."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for family in ("bert", "gpt2", "llama"):
        dirs[family] = root / family
        build_tiny(family).save_pretrained(dirs[family])
    return dirs


def write_config(path: Path, model_dir: Path, modules: list[str], workdir: Path, **overrides) -> Path:
    """A small fit config for a tiny model, with checkpoints under ``workdir``."""
    import yaml

    config = {
        "seed_everything": 0,
        "data": {"model": str(model_dir), "modules": modules, "mode": "concatenated", "ratio": 4.0,
                 "batch_size": 16},
        "model": {"encoder": "mlp", "decoder": "mlp"},
        "trainer": {
            "max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(workdir),
            "callbacks": [{
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(workdir / "ckpt"), "filename": "best", "monitor": "val/rel_fro",
                              "save_top_k": 1, "enable_version_counter": False},
            }],
        },
    }
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        config[section][name] = value
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_dirs) -> dict[str, Path]:
    """A tiny BERT fitted once per test module through the CLI: its config, best checkpoint and work directory."""
    from aecompress.cli import main

    work = tmp_path_factory.mktemp("fitted")
    cfg = write_config(work / "cfg.yaml", tiny_dirs["bert"], ["key"], work)
    main(["fit", "--config", str(cfg)])
    return {"cfg": cfg, "ckpt": work / "ckpt" / "best.ckpt", "work": work}


def char_tokenizer(directory: Path) -> transformers.PreTrainedTokenizerBase:
    """A tiny WordPiece tokenizer (one token per character, ``##`` inside words), fully offline."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *".,'-"]
    assert len(vocab) <= TINY["vocab"], "ids must fit the tiny models' embeddings"
    tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AECOMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama with a character tokenizer, and a local text file to evaluate and calibrate on."""
    root = tmp_path_factory.mktemp("tiny_lm")
    build_tiny("llama").save_pretrained(root / "model")
    char_tokenizer(root / "model")
    lines = [f"Sentence number {i} says something short, and then it ends." for i in range(400)]
    (root / "text.txt").write_text("\n\n".join(lines))
    return {"model": root / "model", "text": root / "text.txt"}


def fake_peer(tmp_path: Path, model: torch.nn.Module, modules: list[str]) -> Path:
    """A stand-in for a peer's output (see ``peers/``): a dense checkpoint of rounded weights, the peer's
    own ``native/`` checkpoint of codes and scales, and the manifest of those stored tensors."""
    import copy
    import json

    from safetensors.torch import save_file

    from aecompress.core.selection import select_groups

    dense = copy.deepcopy(model)
    stored, native = {}, {}
    with torch.no_grad():
        for group in select_groups(model, modules):
            for member in group.members:
                weight = dict(dense.named_parameters())[member.param]
                weight.copy_((weight * 8).round() / 8)
                rows, cols = weight.shape
                stored[member.param] = [{"name": "qweight", "shape": [cols * 4 // 32, rows], "dtype": "int32"},
                                        {"name": "scales", "shape": [cols // 16, rows], "dtype": "float16"}]
                module = member.param.removesuffix(".weight")
                native[f"{module}.qweight"] = torch.zeros(cols * 4 // 32, rows, dtype=torch.int32)
                native[f"{module}.scales"] = torch.zeros(cols // 16, rows, dtype=torch.float16)
    dense.save_pretrained(tmp_path / "peer" / "dense")
    (tmp_path / "peer" / "native").mkdir()
    save_file(native, tmp_path / "peer" / "native" / "model.safetensors")
    (tmp_path / "peer" / "aecompress-peer.json").write_text(json.dumps({"dense": "dense", "peer": "test", "stored": stored}))
    return tmp_path / "peer"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """The real entry point in-process: exit code, stdout, stderr."""
    from aecompress.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
