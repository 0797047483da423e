"""The decoded export: the original architecture with decoded weights, loadable by plain transformers.

It is written with ``save_pretrained`` (safetensors), so ``AutoModel...from_pretrained(DIR)``
loads it with no custom code, atomically (see :mod:`aecompress.core.files`). Its floating weights
are written in float32 (the decoded values exactly) or, asked for, in float16 or bfloat16: half the
files, which is how most checkpoints are shared and served; ``config.json`` records the dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from aecompress.core.dtypes import FLOAT_DTYPES, FloatDtype
from aecompress.core.files import atomic_directory, check_target
from aecompress.core.stored import StoredForm
from aecompress.formats import card, sidecar
from aecompress.formats.extras import copy_aux_files
from aecompress.formats.substitute import decode_all, substituted

log = logging.getLogger(__name__)


def export_decoded(
    model: nn.Module, forms: dict[str, StoredForm], source: str, auto_class: str, model_name: str,
    out_dir: str, overwrite: bool = False, max_shard_size: int | str = "50GB", card_info: dict | None = None,
    dtype: FloatDtype = "float32",
) -> Path:
    """Write the original architecture with decoded weights (safetensors, ``save_pretrained``'s shards) in ``dtype``."""
    check_target(Path(out_dir), overwrite)
    decoded = decode_all(forms.values())  # a damaged form is refused before anything is written
    with atomic_directory(out_dir, overwrite) as tmp:
        copy_aux_files(source, tmp)
        with substituted(model, decoded):  # the caller's model is left as it was
            model.save_pretrained(tmp, max_shard_size=max_shard_size, state_dict=cast(model.state_dict(), dtype))
        record_dtype(model, tmp, dtype)
        meta = {**sidecar.build(forms, model, auto_class, "decoded", model_name), "dtype": dtype}
        sidecar.write(tmp, meta)
        card.write(tmp, meta, source, {**(card_info or {}), "directory_name": Path(out_dir).name})
    log.info("wrote decoded model to %s", out_dir)
    return Path(out_dir)


def cast(state: dict[str, torch.Tensor], dtype: FloatDtype) -> dict[str, torch.Tensor]:
    """The floating tensors in ``dtype``, the rest as they are; tied tensors stay one tensor (saved once)."""
    wanted, done = FLOAT_DTYPES[dtype], {}
    out = {}
    for name, value in state.items():
        if not value.is_floating_point() or value.dtype == wanted:
            out[name] = value
            continue
        key = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if key not in done:
            done[key] = value.to(wanted)
        out[name] = done[key]
    return out


def record_dtype(model: nn.Module, directory: Path, dtype: FloatDtype) -> None:
    """``config.json`` names the dtype written (``save_pretrained`` records the model's own, float32)."""
    if dtype == "float32":
        return
    config, before = model.config, model.config.dtype
    config.dtype = dtype
    try:
        config.save_pretrained(directory)
    finally:
        config.dtype = before
