"""Loading what ``evaluate`` is asked to measure: an original, a decoded export or a compact export."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.formats import sidecar
from aecompress.formats.compact import load_compact
from aecompress.formats.sources import auto_class, load_model, resolve
from aecompress.runtime.load import load_runtime


def load_any(name_or_dir: str, runtime: bool = False) -> tuple[nn.Module, object, str | None]:
    """Load an original, a decoded export or a compact export, with its tokenizer.

    With ``runtime`` a compact export is loaded in its run-time form (weights
    decoded just in time, see :mod:`aecompress.runtime`), so quality is measured
    exactly as that form runs.

    Returns:
        The model in eval mode, its tokenizer, and the name of the original model for an
        export (``source_model`` in its ``aecompress.json``), else ``None``.
    """
    path = Path(name_or_dir).expanduser()
    kind, meta = sidecar.detect(path)
    if kind in ("compact", *sidecar.FROM_PRETRAINED):
        if kind == "compact":
            model = load_runtime(path) if runtime else load_compact(path)
        else:
            model = auto_class(meta.get("auto_class", "AutoModel")).from_pretrained(path, dtype=torch.float32)
        return model.eval(), _export_tokenizer(path, meta), meta.get("source_model")
    if runtime:
        raise AECompressError(
            f"--runtime needs a compact export, and {name_or_dir!r} is not one; "
            "write it with aecompress export --format compact"
        )
    model, source, _ = load_model(name_or_dir)
    return model, load_tokenizer(source), None


def tokenizer_of(name_or_dir: str):
    """The tokenizer :func:`load_any` pairs with a model, without loading the model: cheap enough to check first.

    Raises:
        AECompressError: for a path that does not exist, or a model without a tokenizer.
    """
    path = Path(name_or_dir).expanduser()
    kind, meta = sidecar.detect(path)
    if kind in ("compact", *sidecar.FROM_PRETRAINED):
        return _export_tokenizer(path, meta)
    return load_tokenizer(resolve(name_or_dir))


def _export_tokenizer(path: Path, meta: dict):
    return load_tokenizer(path if _has_tokenizer(path) else meta.get("source", str(path)))


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))


def load_tokenizer(source):
    """A tokenizer from a directory or hub id, with a one-line error."""
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise AECompressError(f"cannot load a tokenizer from {str(source)!r}: {str(err).splitlines()[0]}") from err
