"""Writing compressed models: ``decoded`` (plain transformers) or ``compact``.

``decoded`` is the original architecture with decoded weights in place, saved
with ``save_pretrained`` so that ``AutoModel...from_pretrained(DIR)`` loads it
with no custom code. ``compact`` keeps what the budget counts — every group's
stored form — plus the untouched remaining weights and a JSON sidecar, and is
read back by :func:`aecompress.compact.load_compact`.

Both are written atomically (see :mod:`aecompress.atomic`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from aecompress import __version__
from aecompress.atomic import atomic_directory, check_target
from aecompress.budget import original_bytes
from aecompress.groups import assign_rows, extract_rows
from aecompress.loading import sha256
from aecompress.rowquant import SCALES_SUFFIX
from aecompress.stored import StoredForm, decode

log = logging.getLogger(__name__)

ExportFormat = Literal["decoded", "compact"]
# Version 2 adds int8 codes with ``*_scales`` tensors; version 3 adds codes of 3 to 7 bits
# packed as uint8 bit planes. An export says the oldest version that holds what it stores, so
# a reader that predates a kind of code refuses it instead of decoding raw codes as values,
# and older readers keep reading every export that does not need the newer codes.
FORMAT_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
SIDECAR = "aecompress.json"
COMPRESSED = "compressed.safetensors"
REMAINING = "remaining.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
_SKIP_NAMES = {"config.json", "generation_config.json", SIDECAR, "model.safetensors.index.json"}
_SKIP_DIRS = {"onnx", "openvino", ".git", ".cache"}


def copy_aux_files(source: str, target: Path) -> None:
    """Copy tokenizer and other non-weight files, so the export is usable as-is."""
    src = Path(source)
    if src.is_dir():
        for item in src.iterdir():
            if item.name in _SKIP_NAMES or item.name.endswith(_WEIGHT_SUFFIXES):
                continue
            if item.is_dir():
                if item.name not in _SKIP_DIRS:
                    shutil.copytree(item, target / item.name)
            else:
                shutil.copy2(item, target / item.name)
        return
    try:  # a hub id: let transformers fetch and write the tokenizer
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(target)
    except Exception as err:  # noqa: BLE001 - a model without a tokenizer is still a valid export
        log.warning("no tokenizer copied from %s: %s", source, err)


def sidecar(
    forms: dict[str, StoredForm], source: str, auto_class: str, fmt: ExportFormat, model_name: str
) -> dict:
    """Provenance and accounting shared by both formats."""
    original = sum(f.group.rows * f.group.width for f in forms.values())
    stored = sum(f.numbers for f in forms.values())
    stored_b = sum(f.bytes for f in forms.values())
    return {
        "format": f"aecompress-{fmt}",
        "format_version": _version(forms),
        "aecompress_version": __version__,
        "source_model": model_name,
        "source": source,
        "auto_class": auto_class,
        "target_ratio": next(iter(forms.values())).meta.get("target_ratio") if forms else None,
        "achieved_ratio": original_bytes(original, 1) / stored_b if stored_b else None,
        "original_numbers": original,
        "original_bytes": original_bytes(original, 1),
        "stored_numbers": stored,
        "stored_bytes": stored_b,
        "groups": [
            {
                "group": f.group.to_dict(),
                "method": f.method,
                "meta": f.meta,
                "ratio": f.ratio,
                "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                            for k, t in f.tensors.items()},
            }
            for f in forms.values()
        ],
    }


def _version(forms: dict[str, StoredForm]) -> int:
    """The oldest format version that can hold these forms."""
    coded = [t for f in forms.values() for k, t in f.tensors.items() if k + SCALES_SUFFIX in f.tensors]
    if any(t.dtype == torch.uint8 for t in coded):
        return FORMAT_VERSION
    return 2 if coded else 1


def _write_json(path: Path, data: dict) -> None:
    import json

    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def export_decoded(
    model: nn.Module, forms: dict[str, StoredForm], source: str, auto_class: str, model_name: str,
    out_dir: str, overwrite: bool = False, max_shard_size: int | str = "50GB",
) -> Path:
    """Write the original architecture with decoded weights (safetensors, ``save_pretrained``'s shards)."""
    check_target(Path(out_dir), overwrite)
    originals = {name: extract_rows(model, f.group) for name, f in forms.items()}
    decoded = {name: decode(f) for name, f in forms.items()}
    with atomic_directory(out_dir, overwrite) as tmp:
        copy_aux_files(source, tmp)
        try:
            for name, form in forms.items():
                assign_rows(model, form.group, decoded[name])
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        finally:  # the caller's model is left as it was
            for name, form in forms.items():
                assign_rows(model, form.group, originals[name])
        _write_json(tmp / SIDECAR, sidecar(forms, source, auto_class, "decoded", model_name))
    log.info("wrote decoded model to %s", out_dir)
    return Path(out_dir)


def _remaining_state(model: nn.Module, forms: dict[str, StoredForm]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weights not fully covered by a group, with tied duplicates dropped."""
    whole = {m.param for f in forms.values() for m in f.group.members if m.parts == 1}
    state = model.state_dict()
    dropped_ptrs = {state[p].data_ptr() for p in whole}
    remaining, dropped, seen = {}, [], set()
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if name in whole or tensor.data_ptr() in dropped_ptrs or key in seen:
            dropped.append(name)
            continue
        seen.add(key)
        remaining[name] = tensor.detach().contiguous()
    return remaining, dropped


def export_compact(
    model: nn.Module, forms: dict[str, StoredForm], source: str, auto_class: str, model_name: str,
    out_dir: str, overwrite: bool = False,
) -> Path:
    """Write stored forms + remaining weights + sidecar, with checksums."""
    check_target(Path(out_dir), overwrite)
    compressed = {f"{name}/{k}": t.contiguous() for name, f in forms.items() for k, t in f.tensors.items()}
    remaining, dropped = _remaining_state(model, forms)
    with atomic_directory(out_dir, overwrite) as tmp:
        copy_aux_files(source, tmp)
        model.config.save_pretrained(tmp)
        save_file(compressed, tmp / COMPRESSED, metadata={"format": "aecompress-compact"})
        save_file(remaining, tmp / REMAINING, metadata={"format": "aecompress-compact"})
        meta = sidecar(forms, source, auto_class, "compact", model_name)
        meta["dropped"] = dropped
        meta["checksums"] = {COMPRESSED: sha256(tmp / COMPRESSED), REMAINING: sha256(tmp / REMAINING)}
        _write_json(tmp / SIDECAR, meta)
    log.info("wrote compact model to %s", out_dir)
    return Path(out_dir)


def export(
    model: nn.Module, forms: dict[str, StoredForm], source: str, auto_class: str, model_name: str,
    out_dir: str, fmt: ExportFormat = "decoded", overwrite: bool = False,
) -> Path:
    """Write an export in the chosen format."""
    writer = {"decoded": export_decoded, "compact": export_compact}[fmt]
    return writer(model, forms, source, auto_class, model_name, out_dir, overwrite)
