"""Loading a compact export in its run-time form: the compact reader, then the stand-in modules."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from aecompress.formats.compact import open_compact
from aecompress.runtime.modules import to_runtime


def load_runtime(directory: str | Path, cache: bool | int = False) -> nn.Module:
    """Load a compact export with its compressed weights decoded just in time (never held at full size).

    Args:
        directory: a directory written by ``aecompress export --format compact``.
        cache: see :func:`aecompress.runtime.modules.to_runtime`.

    Returns:
        The model in eval mode; its outputs match the decoded export's to float tolerance.
    """
    model, forms = open_compact(directory)
    return to_runtime(model, forms, cache).eval()
