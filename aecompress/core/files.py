"""Files written whole or not at all, checksums, and JSON read with errors that name the file.

A directory is written so that readers see all of it or none of it: everything is
written into a hidden temporary sibling, then renamed into place. A crash leaves at most a
``.<name>.tmp-*`` directory behind, never a half-written target, and an existing target is
replaced only on request. A failed write (disk full) and SIGTERM remove the temporary directory too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from aecompress.core.errors import AECompressError

log = logging.getLogger(__name__)


EXPORT_MARKER = "aecompress.json"
"""The sidecar every export holds (``formats.sidecar.SIDECAR`` is this name): what marks a directory as one of ours
to replace."""


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse an output directory that cannot or may not be written, before any expensive work starts.

    ``overwrite`` replaces an earlier export (a directory holding the sidecar) or an empty directory, never a
    directory of someone's own files: replacing it would delete them, and no flag should mean that.
    """
    _refuse_existing(target, overwrite)
    if target.is_dir() and not (target / EXPORT_MARKER).is_file() and any(target.iterdir()):
        found = sorted(p.name for p in target.iterdir())
        raise AECompressError(
            f"output directory {str(target)!r} is not an aecompress export (it holds {', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}); --overwrite replaces only an earlier export (a directory with "
            f"{EXPORT_MARKER}): choose another --out_dir"
        )
    _refuse_unwritable(target)


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise AECompressError(f"output directory {str(target)!r} exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise AECompressError(f"output path {str(target)!r} exists and is not a directory")


def _refuse_unwritable(target: Path) -> None:
    """The directory that will hold the target (its nearest existing ancestor) must be a writable directory."""
    parent = target.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise AECompressError(f"cannot write {str(target)!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AECompressError(f"cannot write {str(target)!r}: {str(parent)!r} is not writable")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block succeeds."""
    target = Path(target)
    _refuse_existing(target, overwrite)  # caches are replaced whatever they hold; exports call check_target first
    clear_leftovers(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        raise AECompressError(f"cannot create {str(target)!r}: {err}") from err
    try:
        with _exit_on_sigterm(target):
            yield tmp
            _readable(tmp)
            _replace(tmp, target, overwrite)
    except (OSError, SafetensorError) as err:  # disk full, quota, permissions: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise AECompressError(f"writing {str(target)!r} failed, nothing was written: {err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clear_leftovers(target: Path) -> list[str]:
    """Remove what an interrupted write of ``target`` left (its process is gone); name what cannot be told apart.

    Returns:
        The names removed.
    """
    removed = []
    parent = target.parent
    for path in sorted(parent.glob(f".{target.name}.tmp-*")) + sorted(parent.glob(f".{target.name}.old-*")):
        found = _LEFTOVER.fullmatch(path.name[len(target.name) + 1 :])
        pid = int(found["pid"]) if found and found["pid"] else None
        if pid is not None and not _alive(pid) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
            log.warning("removed %s, left by an interrupted write of %s (process %d is gone)", path, target.name, pid)
        else:
            log.warning("%s was left by an earlier write of %s; remove it if no other aecompress is writing there",
                        path, target.name)
    return removed


_LEFTOVER = re.compile(r"\.(tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _readable(tmp: Path) -> None:
    """Every file and directory of an export readable as the umask allows (some writers create files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp, *tmp.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _exit_on_sigterm(target: Path) -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` while writing, so the temporary directory is removed.

    Only where nobody else handles SIGTERM (Lightning installs its own during ``fit``),
    and only in the main thread, where Python runs signal handlers.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        print(f"aecompress: terminated by SIGTERM; {str(target)!r} was not written", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM)  # 143, as a shell reports a process SIGTERM ended, and as fit exits

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _replace(tmp: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        try:
            os.rename(tmp, target)
            return
        except OSError as err:  # another writer won the race
            raise AECompressError(f"output directory {str(target)!r} appeared while writing: {err}") from err
    if not overwrite:
        raise AECompressError(f"output directory {str(target)!r} appeared while writing; nothing was replaced")
    old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (cache manifests and export checksums)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


SAFETENSORS_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                          "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
"""Bytes per element of each safetensors dtype code."""


def safetensors_header(path: Path) -> dict[str, dict]:
    """A safetensors file's tensors (name -> ``dtype``, ``shape``, ``data_offsets``), read from its header alone.

    No tensor is read: the 8-byte little-endian header length, then the JSON header. Each tensor's
    bytes must lie inside the file and be exactly as many as its shape and dtype need, so the header
    says what the file really stores.

    Raises:
        AECompressError: naming the file, for a header that cannot be read or does not fit the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            data = path.stat().st_size - 8 - size
            header = json.loads(fh.read(size)) if 0 < size and data >= 0 else None
    except (OSError, ValueError) as err:
        raise AECompressError(f"cannot read the safetensors header of {str(path)!r}: {err}") from err
    if not isinstance(header, dict):
        raise AECompressError(f"{str(path)!r} is not a safetensors file (its header is missing, truncated or not a mapping)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not _fits(info, data):
            raise AECompressError(f"{str(path)!r} is damaged: tensor {name!r} does not fit the file as its header says")
    return header


def _fits(info, data: int) -> bool:
    """Whether a header entry's bytes lie in the file's data and match its shape and dtype."""
    try:
        begin, end = info["data_offsets"]
        shape, item = info["shape"], SAFETENSORS_ITEM_BYTES[info["dtype"]]
    except (KeyError, TypeError, ValueError):
        return False
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        return False
    return 0 <= begin <= end <= data and end - begin == math.prod(shape) * item


def read_json(path: Path) -> dict:
    """Read a JSON file, with an error that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AECompressError(f"cannot read {str(path)!r}: {err}") from err


def write_json(path: Path, data: dict) -> None:
    """Write JSON the way every aecompress sidecar and report is written: indented, key order kept."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
