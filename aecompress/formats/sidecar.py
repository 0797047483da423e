"""The sidecar, ``aecompress.json``: what an export holds, how it was made, and how big it is.

This module owns the sidecar's file names, its format versions, how it is built, written
and read, and how a directory's kind is told (compact export, decoded export, plain
checkpoint). Every reader goes through :func:`detect` and :func:`read_compact`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from aecompress.core.budget import bits_per_weight, original_bytes, whole_model
from aecompress.core.codes import SCALES_SUFFIX
from aecompress.core.errors import AECompressError
from aecompress.core.files import EXPORT_MARKER, read_json, write_json
from aecompress.core.stored import StoredForm
from aecompress.core.version import __version__
from aecompress.formats.sources import public_name

ExportFormat = Literal["decoded", "compact", "compressed-tensors"]
FROM_PRETRAINED = ("decoded", "compressed-tensors")
"""The export formats plain transformers loads with ``from_pretrained`` (compressed-tensors needs its package)."""
SIDECAR = EXPORT_MARKER  # core names it, so that --overwrite can recognise an export below this layer
COMPRESSED = "compressed.safetensors"
REMAINING = "remaining.safetensors"
MANIFEST = "SHA256SUMS"
"""The checksum of every file of a compact export (see :mod:`aecompress.formats.manifest`)."""
# Version 2 adds int8 codes with ``*_scales`` tensors; version 3 adds codes of 3 to 7 bits
# packed as uint8 bit planes. An export says the oldest version that holds what it stores, so
# a reader that predates a kind of code refuses it instead of decoding raw codes as values,
# and older readers keep reading every export that does not need the newer codes.
FORMAT_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
Kind = Literal["compact", "decoded", "compressed-tensors", "plain", "none"]


def covered(model: nn.Module, forms: dict[str, StoredForm]) -> dict[str, int]:
    """Parameter name -> how many of its numbers the compressed groups hold."""
    params = dict(model.named_parameters())
    out: dict[str, int] = {}
    for form in forms.values():
        for member in form.group.members:
            rows, width = member.view(params[member.param]).shape
            out[member.param] = out.get(member.param, 0) + rows * width
    return out


def build(forms: dict[str, StoredForm], model: nn.Module, auto_class: str, fmt: ExportFormat, model_name: str) -> dict:
    """Provenance and accounting shared by both formats: what was compressed and its size, counted by the accountant.

    The source is named by its hub id, packaged name or directory name, never by a path of this machine.
    """
    original = sum(f.group.rows * f.group.width for f in forms.values())
    stored = sum(f.numbers for f in forms.values())
    stored_b = sum(f.bytes for f in forms.values())
    return {
        "format": f"aecompress-{fmt}",
        "format_version": version(forms),
        "aecompress_version": __version__,
        "source_model": public_name(model_name),
        "auto_class": auto_class,
        "target_ratio": next(iter(forms.values())).meta.get("target_ratio") if forms else None,
        "achieved_ratio": original_bytes(original, 1) / stored_b if stored_b else None,
        "original_numbers": original,
        "original_bytes": original_bytes(original, 1),
        "stored_numbers": stored,
        "stored_bytes": stored_b,
        "bits_per_weight": bits_per_weight(stored_b, original),
        "whole_model": whole_model(dict(model.named_parameters()), covered(model, forms), stored_b),
        "groups": [
            {
                "group": f.group.to_dict(),
                "method": f.method,
                "meta": f.meta,
                "ratio": f.ratio,
                "bits_per_weight": bits_per_weight(f.bytes, f.group.rows * f.group.width),
                "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                            for k, t in f.tensors.items()},
            }
            for f in forms.values()
        ],
    }


def version(forms: dict[str, StoredForm]) -> int:
    """The oldest format version that can hold these forms."""
    coded = [t for f in forms.values() for k, t in f.tensors.items() if k + SCALES_SUFFIX in f.tensors]
    if any(t.dtype == torch.uint8 for t in coded):
        return FORMAT_VERSION
    return 2 if coded else 1


def write(directory: Path, meta: dict) -> None:
    """Write the sidecar into an export directory."""
    write_json(Path(directory) / SIDECAR, meta)


def detect(directory: str | Path) -> tuple[Kind, dict | None]:
    """What a directory holds: an aecompress export (with its sidecar), a plain checkpoint, or neither.

    Raises:
        AECompressError: for a sidecar that names a format this aecompress does not know.
    """
    directory = Path(directory)
    path = directory / SIDECAR
    if directory.is_dir() and path.is_file():
        meta = read_json(path)
        kind = str(meta.get("format", "")).removeprefix("aecompress-")
        if kind not in ("compact", *FROM_PRETRAINED):
            raise AECompressError(f"{str(directory)!r} holds unknown format {meta.get('format')!r}; valid: "
                                  "aecompress-decoded, aecompress-compact, aecompress-compressed-tensors")
        return kind, meta  # type: ignore[return-value]
    if directory.is_dir() and (directory / "config.json").is_file():
        return "plain", None
    return "none", None


def read_compact(directory: Path) -> dict:
    """The sidecar of a compact export, checked for format, version and the keys a reader needs."""
    directory = Path(directory)
    kind, meta = detect(directory)
    if kind == "plain":
        raise AECompressError(
            f"{str(directory)!r} is a plain transformers checkpoint, not a compact aecompress export; "
            "write one with `aecompress export --format compact`"
        )
    if kind == "none":
        raise AECompressError(f"{str(directory)!r} is not a compact aecompress export: no {SIDECAR}")
    if kind in FROM_PRETRAINED:
        raise AECompressError(
            f"{str(directory)!r} is a {kind} export, not a compact one; "
            "load it with transformers' from_pretrained, or export with `--format compact`"
        )
    if meta.get("format_version") not in SUPPORTED_VERSIONS:
        raise AECompressError(
            f"compact format version {meta.get('format_version')!r} is not supported (this aecompress reads "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade aecompress"
        )
    expected = {"groups": list, "auto_class": str, "checksums": dict}
    wrong = [key for key, kind in expected.items() if not isinstance(meta.get(key), kind)]
    if wrong:
        raise AECompressError(
            f"{str(directory / SIDECAR)!r} is damaged: {wrong[0]!r} is missing or not a {expected[wrong[0]].__name__}"
        )
    return meta
