"""Writing a directory so that readers see all of it or none of it.

Everything is written into a hidden temporary sibling, then renamed into
place. A crash leaves at most a ``.<name>.tmp-*`` directory behind, never a
half-written target, and an existing target is replaced only on request. A
failed write (disk full) and SIGTERM remove the temporary directory too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

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
