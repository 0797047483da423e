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
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from aecompress.core.errors import AECompressError


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse an existing target before any expensive work starts."""
    if target.exists() and not overwrite:
        raise AECompressError(f"output directory {str(target)!r} exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise AECompressError(f"output path {str(target)!r} exists and is not a directory")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block succeeds."""
    target = Path(target)
    check_target(target, overwrite)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        raise AECompressError(f"cannot create {str(target)!r}: {err}") from err
    try:
        with _exit_on_sigterm(target):
            yield tmp
            _replace(tmp, target, overwrite)
    except (OSError, SafetensorError) as err:  # disk full, quota, permissions: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise AECompressError(f"writing {str(target)!r} failed, nothing was written: {err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _exit_on_sigterm(target: Path) -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` while writing, so the temporary directory is removed.

    Only where nobody else handles SIGTERM (Lightning installs its own during ``fit``),
    and only in the main thread, where Python runs signal handlers.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(f"aecompress: terminated by SIGTERM; {str(target)!r} was not written")

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
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
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


def read_json(path: Path) -> dict:
    """Read a JSON file, with an error that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AECompressError(f"cannot read {str(path)!r}: {err}") from err


def write_json(path: Path, data: dict) -> None:
    """Write JSON the way every aecompress sidecar and report is written: indented, key order kept."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
