"""``aecompress verify``: is a compact export whole, and what ratio does it reach?

Everything :func:`aecompress.formats.compact.load_compact` relies on is checked, without
building the full-size model: the sidecar's format and fields, both tensor files' SHA-256
checksums, every stored tensor's name, shape and dtype against the sidecar, the
remaining weights and each group's matrices against the architecture (built
on the meta device, from transformers, never from the artifact), and every
group decodes to finite rows of its shape. The achieved ratio is counted
again by the one accountant and must match what the sidecar claims. Last, every file of the
export (the sidecar, config, tokenizer and card too) must match its checksum in ``SHA256SUMS``
(see :mod:`aecompress.formats.manifest`): the checks before it name what is wrong in terms of
the model, this one catches any other change, such as a provenance field or one byte of the card.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers

from aecompress.core.budget import Budget, original_bytes
from aecompress.core.errors import AECompressError
from aecompress.formats.compact import check_members, check_remaining, stored_forms, verified_tensors
from aecompress.formats.manifest import check_manifest
from aecompress.formats.sidecar import COMPRESSED, MANIFEST, REMAINING, SIDECAR, read_compact
from aecompress.formats.sources import auto_class
from aecompress.methods import decode


def check_compact(directory: str | Path) -> dict:
    """Check a compact export thoroughly; return what was found.

    Returns:
        ``directory``, ``groups`` (name, method, stored bytes, ratio per group),
        ``achieved_ratio``, ``target_ratio``, ``stored_bytes``, ``original_bytes``, and
        ``every_file``: whether every file was checked (an export from before ``SHA256SUMS``
        has only its tensor files covered).

    Raises:
        AECompressError: naming the first problem found.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AECompressError(f"{str(directory)!r} is not a directory")
    meta = read_compact(directory)
    compressed = verified_tensors(directory, COMPRESSED, meta["checksums"].get(COMPRESSED))
    remaining = verified_tensors(directory, REMAINING, meta["checksums"].get(REMAINING))
    forms = stored_forms(meta, compressed)
    claimed = {f"{f.group.name}/{k}" for f in forms for k in f.tensors}
    extra = sorted(set(compressed) - claimed)
    if extra:
        raise AECompressError(f"{COMPRESSED} holds {extra[0]!r}, which no group in the sidecar accounts for")
    _check_architecture(directory, meta, remaining, forms)
    groups = []
    for form in forms:
        rows = decode(form)
        if not torch.isfinite(rows).all():
            raise AECompressError(f"group {form.group.name!r} decodes to NaN or inf")
        target = form.meta.get("target_ratio")
        if target and form.bytes > Budget.of_ratio(float(target)).bytes(form.group.rows, form.group.width):
            raise AECompressError(
                f"group {form.group.name!r} stores {form.bytes} bytes, over its budget at target ratio {target}"
            )
        groups.append({"group": form.group.name, "method": form.method, "bytes": form.bytes, "ratio": form.ratio})
    original = original_bytes(sum(f.group.rows * f.group.width for f in forms), 1)
    stored = sum(f.bytes for f in forms)
    achieved = original / stored if stored else None
    said = meta.get("achieved_ratio")
    if (achieved is None) != (said is None) or (achieved is not None and not math.isclose(achieved, said, rel_tol=1e-9)):
        raise AECompressError(f"the sidecar claims ratio {said}, but the stored tensors give {achieved}")
    every_file = _check_files(directory, meta)
    return {
        "directory": str(directory),
        "groups": groups,
        "achieved_ratio": achieved,
        "target_ratio": meta.get("target_ratio"),
        "stored_bytes": stored,
        "original_bytes": original,
        "every_file": every_file,
    }


def _check_files(directory: Path, meta: dict) -> bool:
    """Every file against the manifest the sidecar names; False for an export written before manifests."""
    if "manifest" not in meta:
        return False
    if meta["manifest"] != MANIFEST:
        raise AECompressError(f"{SIDECAR} names manifest {meta['manifest']!r}; valid: {MANIFEST}")
    check_manifest(directory, meta["checksums"])  # the tensor files were just verified against these
    return True


def _check_architecture(directory: Path, meta: dict, remaining: dict[str, torch.Tensor], forms: list) -> None:
    """Remaining weights and group members against the architecture, built without storage."""
    try:
        config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
        with torch.device("meta"):
            model = auto_class(meta["auto_class"]).from_config(config, dtype=torch.float32)
    except (OSError, ValueError) as err:
        if isinstance(err, AECompressError):
            raise
        raise AECompressError(f"cannot build the architecture from {str(directory / 'config.json')!r}: {err}") from err
    check_remaining(model.state_dict(), remaining, meta.get("dropped", []))
    check_members(model, forms)


def verify(directory: str) -> None:
    """Check a compact export's checksums and shapes, and report its achieved ratio.

    Exits 0 for a valid artifact; otherwise prints one line naming the problem
    and exits non-zero.

    Args:
        directory: a directory written by ``aecompress export --format compact``
            (may be given positionally: ``aecompress verify DIR``).
    """
    report = check_compact(directory)
    for g in report["groups"]:
        print(f"  {g['group']}: {g['method']}, {g['bytes']} bytes, ratio {g['ratio']:.3f}")
    target = report["target_ratio"]
    covered = (f"every file matches {MANIFEST}" if report["every_file"] else
               f"only the tensor files are covered (written before {MANIFEST}; export again to cover every file)")
    print(
        f"ok: {report['directory']}: checksums and shapes match; achieved ratio {report['achieved_ratio']:.3f}"
        + (f" (target {target})" if target else "") + f"; {covered}"
    )
