"""Turning a model name into a loaded transformers model, and telling what kind of model it is.

A name is a local directory, a packaged name that resolves offline (see
:mod:`aecompress.formats.packaged`), or a Hugging Face hub id. Remote code is never trusted
unless the caller says so explicitly.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal

import torch
import transformers
from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.core.files import read_json
from aecompress.formats.packaged import PACKAGED, packaged_dir

log = logging.getLogger(__name__)

ModelClass = Literal["auto", "base", "causal_lm", "masked_lm"]

AUTO_CLASSES = {
    "base": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
}


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
    packaged = packaged_dir(name)
    if packaged is not None:
        return str(packaged)
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


def model_kind(model: nn.Module) -> str:
    """``causal_lm``, ``masked_lm`` or ``encoder``, from the model's class."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if name.endswith("ForMaskedLM"):
        return "masked_lm"
    return "encoder"


def max_positions(model: nn.Module) -> int | None:
    """The longest input the model's position embeddings allow, if it says."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def public_name(name: str) -> str:
    """How a model is named in what we write: a packaged name or hub id as given, a local directory by its name only.

    An export must not carry the path of the machine that made it.
    """
    if name in PACKAGED:
        return name
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        return path.resolve().name
    return name
