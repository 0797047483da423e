"""Loading a compact export in its run-time form: the compact reader, then the stand-in modules."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from aecompress.core.memory import give_back
from aecompress.formats.compact import open_compact
from aecompress.runtime.modules import to_runtime


def load_runtime(directory: str | Path, cache: bool | int = False, kernel: str = "int4") -> nn.Module:
    """Load a compact export with its compressed weights decoded just in time (never held at full size).

    Args:
        directory: a directory written by ``aecompress export --format compact``.
        cache: see :func:`aecompress.runtime.modules.to_runtime`.
        kernel: ``int4`` (the default): grid codes of up to 4 bits multiply one new token at a time
            through torch's fused kernel, in bfloat16; ``float32``: every step exact.

    Returns:
        The model in eval mode; its outputs match the decoded export's to float tolerance (with ``kernel:
        int4``, to bfloat16 rounding on inputs of at most 16 positions).
    """
    model, forms = open_compact(directory)
    model = to_runtime(model, forms, cache, kernel).eval()
    # The fresh model's own weights for the compressed matrices were built and dropped: hand their memory back,
    # or glibc keeps it (SmolLM2 at 3 bpw: 913 MiB resident after loading, 500 MiB with the trim).
    give_back()
    return model
