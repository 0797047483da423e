"""Writing a directory so that readers see all of it or none of it.

Everything is written into a hidden temporary sibling, then renamed into
place. A crash leaves at most a ``.<name>.tmp-*`` directory behind, never a
half-written target, and an existing target is replaced only on request.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from aecompress.errors import AECompressError


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
