"""The decoded export: the original architecture with decoded weights, loadable by plain transformers.

It is written with ``save_pretrained`` (safetensors), so ``AutoModel...from_pretrained(DIR)``
loads it with no custom code, atomically (see :mod:`aecompress.core.files`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from aecompress.core.files import atomic_directory, check_target
from aecompress.core.stored import StoredForm
from aecompress.formats import card, sidecar
from aecompress.formats.extras import copy_aux_files
from aecompress.formats.substitute import decode_all, substituted

log = logging.getLogger(__name__)


def export_decoded(
    model: nn.Module, forms: dict[str, StoredForm], source: str, auto_class: str, model_name: str,
    out_dir: str, overwrite: bool = False, max_shard_size: int | str = "50GB", card_info: dict | None = None,
) -> Path:
    """Write the original architecture with decoded weights (safetensors, ``save_pretrained``'s shards)."""
    check_target(Path(out_dir), overwrite)
    decoded = decode_all(forms.values())  # a damaged form is refused before anything is written
    with atomic_directory(out_dir, overwrite) as tmp:
        copy_aux_files(source, tmp)
        with substituted(model, decoded):  # the caller's model is left as it was
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        meta = sidecar.build(forms, model, auto_class, "decoded", model_name)
        sidecar.write(tmp, meta)
        card.write(tmp, meta, source, {**(card_info or {}), "directory_name": Path(out_dir).name})
    log.info("wrote decoded model to %s", out_dir)
    return Path(out_dir)
