"""Writing a compressed model in the format asked for: ``decoded`` (plain transformers), ``compact`` or ``compressed-tensors``.

A decoded export may be written in float16 or bfloat16 (``--dtype``); a compact or compressed-tensors export
stores each method's own tensors in the dtypes the method chose, so it takes no ``--dtype``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from aecompress.core.dtypes import FLOAT_DTYPES
from aecompress.core.errors import AECompressError
from aecompress.core.stored import StoredForm
from aecompress.formats.compact import export_compact
from aecompress.formats.decoded import export_decoded
from aecompress.formats.lazy import TensorFiles
from aecompress.formats.pack_quantized import export_pack_quantized
from aecompress.formats.sidecar import ExportFormat
from aecompress.formats.streaming import export_streaming


def export(
    model: nn.Module, forms: dict[str, StoredForm], source: str, auto_class: str, model_name: str,
    out_dir: str, fmt: ExportFormat = "decoded", overwrite: bool = False, card_info: dict | None = None,
    dtype: str = "float32",
    files: TensorFiles | None = None,
) -> Path:
    """Write an export in the chosen format (decoded weights in ``dtype``), with its own model card
    (see :mod:`aecompress.formats.card`).

    With ``files`` the model is a skeleton (block by block never loads it whole): its weights are streamed from them.
    """
    refuse_own_source(source, out_dir)
    check_dtype(dtype, fmt)
    if files is not None and fmt == "compressed-tensors":
        raise AECompressError("--format compressed-tensors needs the whole model in memory; block by block writes "
                              "decoded or compact exports (use one of those, or drop --max_memory / --blockwise)")
    if files is not None and fmt == "decoded":
        return export_streaming(model, files, forms, source, auto_class, model_name, out_dir, overwrite, card_info,
                                dtype=dtype)
    if fmt == "decoded":
        return export_decoded(model, forms, source, auto_class, model_name, out_dir, overwrite, card_info=card_info,
                              dtype=dtype)
    if fmt == "compressed-tensors":
        return export_pack_quantized(model, forms, source, auto_class, model_name, out_dir, overwrite, card_info=card_info)
    return export_compact(model, forms, source, auto_class, model_name, out_dir, overwrite, card_info=card_info,
                          files=files)


def check_dtype(dtype: str, fmt: str) -> None:
    """One clear error for a dtype that is not a float dtype, or one asked of the compact format."""
    if dtype not in FLOAT_DTYPES:
        raise AECompressError(f"--dtype {dtype!r} is not one of: {', '.join(FLOAT_DTYPES)}")
    if dtype != "float32" and fmt != "decoded":
        raise AECompressError(f"--dtype {dtype} applies to the decoded format only; the {fmt} format stores the "
                              "method's own tensors (drop --dtype, or use --format decoded)")


def refuse_own_source(source: str, out_dir: str) -> None:
    """Refuse an export that would replace (or sit above) the model it was made from."""
    src, out = Path(source).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if src.exists() and (src == out or out in src.parents):
        raise AECompressError(
            f"--out_dir {out_dir!r} is the source model's own directory (or holds it); export somewhere else"
        )
