"""Writing a compressed model in the format asked for: ``decoded`` (plain transformers) or ``compact``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.core.stored import StoredForm
from aecompress.formats.compact import export_compact
from aecompress.formats.decoded import export_decoded
from aecompress.formats.lazy import TensorFiles
from aecompress.formats.sidecar import ExportFormat
from aecompress.formats.streaming import export_streaming


def export(
    model: nn.Module, forms: dict[str, StoredForm], source: str, auto_class: str, model_name: str,
    out_dir: str, fmt: ExportFormat = "decoded", overwrite: bool = False, card_info: dict | None = None,
    files: TensorFiles | None = None,
) -> Path:
    """Write an export in the chosen format, with its own model card (see :mod:`aecompress.formats.card`).

    With ``files`` the model is a skeleton (block by block never loads it whole): its weights are streamed from them.
    """
    refuse_own_source(source, out_dir)
    if files is not None and fmt == "decoded":
        return export_streaming(model, files, forms, source, auto_class, model_name, out_dir, overwrite, card_info)
    if fmt == "decoded":
        return export_decoded(model, forms, source, auto_class, model_name, out_dir, overwrite, card_info=card_info)
    return export_compact(model, forms, source, auto_class, model_name, out_dir, overwrite, card_info=card_info,
                          files=files)


def refuse_own_source(source: str, out_dir: str) -> None:
    """Refuse an export that would replace (or sit above) the model it was made from."""
    src, out = Path(source).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if src.exists() and (src == out or out in src.parents):
        raise AECompressError(
            f"--out_dir {out_dir!r} is the source model's own directory (or holds it); export somewhere else"
        )
