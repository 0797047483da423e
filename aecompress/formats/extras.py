"""The files an export carries besides weights: the tokenizer and the source's other small files.

An export must be usable as it is (``from_pretrained`` on the directory), so everything the
source has that is not weights or a config we write ourselves is copied along.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from aecompress.formats.sidecar import MANIFEST, SIDECAR

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
# The original's README.md is its model card, which describes the uncompressed model: the export writes its own.
_SKIP_NAMES = {"config.json", "generation_config.json", SIDECAR, MANIFEST, "model.safetensors.index.json", "README.md"}
_SKIP_DIRS = {"onnx", "openvino", ".git", ".cache"}


def copy_aux_files(source: str, target: Path) -> None:
    """Copy tokenizer and other non-weight files, so the export is usable as-is."""
    src = Path(source)
    if src.is_dir():
        for item in src.iterdir():
            if item.name in _SKIP_NAMES or item.name.endswith(_WEIGHT_SUFFIXES):
                continue
            if item.is_dir():
                if item.name not in _SKIP_DIRS:
                    shutil.copytree(item, target / item.name)
            else:
                shutil.copy2(item, target / item.name)
        return
    try:  # a hub id: let transformers fetch and write the tokenizer
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(target)
    except Exception as err:  # noqa: BLE001 - a model without a tokenizer is still a valid export
        log.warning("no tokenizer copied from %s: %s", source, err)
