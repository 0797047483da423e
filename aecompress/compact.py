"""Reading a compact export back into a transformers model.

Reload goes config -> empty model -> remaining weights -> decoded groups.
The model code comes from transformers, never from the artifact: the sidecar
may only name an Auto class and a compression method from fixed registries,
and both checksums must match before any tensor is used.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from aecompress.errors import AECompressError
from aecompress.export import COMPRESSED, FORMAT_VERSION, REMAINING, SIDECAR, sha256
from aecompress.groups import WeightGroup, assign_rows
from aecompress.loading import auto_class, read_json
from aecompress.stored import DECODERS, StoredForm, decode


def read_sidecar(directory: Path) -> dict:
    """The compact sidecar, checked for format and version."""
    path = directory / SIDECAR
    if not path.is_file():
        raise AECompressError(f"{str(directory)!r} is not a compact aecompress export: no {SIDECAR}")
    meta = read_json(path)
    if meta.get("format") != "aecompress-compact":
        raise AECompressError(
            f"{str(directory)!r} holds format {meta.get('format')!r}, not a compact export; "
            "load a decoded export with transformers' from_pretrained"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise AECompressError(f"compact format version {meta.get('format_version')!r} is not supported")
    return meta


def _verified_tensors(directory: Path, name: str, expected: str | None) -> dict[str, torch.Tensor]:
    path = directory / name
    if not path.is_file():
        raise AECompressError(f"compact export {str(directory)!r} is missing {name}")
    if sha256(path) != expected:
        raise AECompressError(f"checksum mismatch for {str(path)!r}: the file was changed after export")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise AECompressError(f"cannot read {str(path)!r}: {err}") from err


def stored_forms(meta: dict, compressed: dict[str, torch.Tensor]) -> list[StoredForm]:
    """Rebuild each group's stored form, checking names, shapes and method."""
    forms = []
    for entry in meta["groups"]:
        group = WeightGroup.from_dict(entry["group"])
        if entry["method"] not in DECODERS:
            raise AECompressError(
                f"group {group.name!r} asks for unknown method {entry['method']!r}; valid: {', '.join(sorted(DECODERS))}"
            )
        tensors = {}
        for key, info in entry["tensors"].items():
            full = f"{group.name}/{key}"
            if full not in compressed:
                raise AECompressError(f"compact export is missing tensor {full!r}")
            if list(compressed[full].shape) != list(info["shape"]):
                raise AECompressError(
                    f"tensor {full!r} has shape {list(compressed[full].shape)}, sidecar says {info['shape']}"
                )
            tensors[key] = compressed[full]
        forms.append(StoredForm(entry["method"], group, tensors, entry.get("meta", {})))
    return forms


def load_compact(directory: str | Path) -> nn.Module:
    """Rebuild the transformers model from a compact export, with decoded weights.

    Args:
        directory: a directory written by ``aecompress export --format compact``.

    Returns:
        The model in eval mode; its weights are ``torch.equal`` to the decoded export's.
    """
    directory = Path(directory)
    meta = read_sidecar(directory)
    checksums = meta.get("checksums", {})
    compressed = _verified_tensors(directory, COMPRESSED, checksums.get(COMPRESSED))
    remaining = _verified_tensors(directory, REMAINING, checksums.get(REMAINING))
    forms = stored_forms(meta, compressed)
    config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
    model = auto_class(meta["auto_class"]).from_config(config, dtype=torch.float32)
    own = model.state_dict()
    for name, tensor in remaining.items():
        if name not in own:
            raise AECompressError(f"compact export holds {name!r}, which this architecture does not have")
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise AECompressError(f"tensor {name!r} has shape {tuple(tensor.shape)}, model expects {tuple(own[name].shape)}")
    missing = set(model.load_state_dict(remaining, strict=False).missing_keys) - set(meta.get("dropped", []))
    if missing:
        raise AECompressError(f"compact export lacks weights for {sorted(missing)[:3]}")
    params = dict(model.named_parameters())
    for form in forms:
        for member in form.group.members:
            if member.param not in params:
                raise AECompressError(f"group {form.group.name!r} names {member.param!r}, which this model does not have")
        assign_rows(model, form.group, decode(form))
    return model.eval()
