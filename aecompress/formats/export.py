"""Writing a compressed model in the format asked for: ``decoded`` (plain transformers) or ``compact``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from aecompress.core.stored import StoredForm
from aecompress.formats.compact import export_compact
from aecompress.formats.decoded import export_decoded
from aecompress.formats.sidecar import ExportFormat


def export(
    model: nn.Module, forms: dict[str, StoredForm], source: str, auto_class: str, model_name: str,
    out_dir: str, fmt: ExportFormat = "decoded", overwrite: bool = False,
) -> Path:
    """Write an export in the chosen format."""
    writer = {"decoded": export_decoded, "compact": export_compact}[fmt]
    return writer(model, forms, source, auto_class, model_name, out_dir, overwrite)
