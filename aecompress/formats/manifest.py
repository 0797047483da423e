"""``SHA256SUMS``: the checksum of every file of a compact export, the sidecar included.

The sidecar records the checksums of the two tensor files, which every reader checks before a
tensor is used. It cannot record its own, so the export's last write is this manifest: one
``<sha256>  <path>`` line per file (sorted, paths relative to the export, ``sha256sum -c``
reads it as it is). ``verify`` reads it strictly, so one changed byte anywhere is refused: in a
listed file its checksum differs; in the manifest itself a line no longer parses, names a file
that is not there, or leaves one unlisted. The sidecar names the manifest, so a newer export
whose manifest was removed is refused too; an export written before the manifest existed has
only its tensor files covered, and ``verify`` says so.
"""

from __future__ import annotations

import re
from pathlib import Path

from aecompress.core.errors import AECompressError
from aecompress.core.files import sha256
from aecompress.formats.sidecar import MANIFEST, SIDECAR

_LINE = re.compile(r"(?P<digest>[0-9a-f]{64})  (?P<path>[^\x00-\x1f\\]+)")


def _files(directory: Path) -> list[str]:
    """Every file under ``directory`` but the manifest, as sorted relative POSIX paths."""
    found = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(name for name in found if name != MANIFEST)


def write_manifest(directory: Path, known: dict[str, str] | None = None) -> None:
    """Write the manifest of every file in ``directory``: the last write of an export.

    Args:
        known: checksums already computed for some files (the tensor files' in the sidecar), not hashed again.
    """
    directory = Path(directory)
    known = known or {}
    lines = [f"{known.get(name) or sha256(directory / name)}  {name}\n" for name in _files(directory)]
    (directory / MANIFEST).write_text("".join(lines))


def check_manifest(directory: Path, known: dict[str, str] | None = None) -> None:
    """Every file of the export is listed in the manifest, once, with its checksum; nothing else is.

    Args:
        known: checksums of files the caller has just verified against them (the tensor files against the
            sidecar's), compared as they are rather than hashing those files a second time.

    Raises:
        AECompressError: naming the first file (or manifest line) that does not match.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise AECompressError(f"compact export {str(directory)!r} is missing {MANIFEST}, which its {SIDECAR} names")
    listed, known = _parse(path), known or {}
    for name in _files(directory):
        if name not in listed:
            raise AECompressError(f"{str(directory / name)!r} is not listed in {MANIFEST}: it was added after export")
    for name, digest in listed.items():
        if not (directory / name).is_file():
            raise AECompressError(f"compact export {str(directory)!r} is missing {name}, which {MANIFEST} lists")
        if (known.get(name) or sha256(directory / name)) != digest:
            raise AECompressError(f"checksum mismatch for {str(directory / name)!r}: the file was changed after export")


def _parse(path: Path) -> dict[str, str]:
    """The manifest's lines as path -> checksum, refusing anything that is not exactly one well-formed line per file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AECompressError(f"cannot read {str(path)!r}: {err}") from err
    if not text.endswith("\n"):
        raise AECompressError(f"{str(path)!r} is damaged: it does not end with a newline")
    listed: dict[str, str] = {}
    for number, line in enumerate(text[:-1].split("\n"), start=1):
        found = _LINE.fullmatch(line)
        if found is None or found["path"] in listed or ".." in found["path"].split("/"):
            raise AECompressError(f"{str(path)!r} is damaged at line {number}: expected '<sha256>  <file>' once per file")
        listed[found["path"]] = found["digest"]
    return listed

