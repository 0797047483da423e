"""Reading only the weights a run needs, straight from a checkpoint's safetensors files.

A model of billions of parameters need not be in memory to compress a few of
its matrices. :func:`open_lazy` builds the model's *skeleton* on the meta
device (every parameter's name, shape and owning module type, no storage), so
group selection works exactly as on a loaded model, and :class:`TensorFiles`
reads just the selected tensors from ``model.safetensors`` or from the shards
named in ``model.safetensors.index.json``. :func:`read_rows` stacks a group's
rows from those tensors, the same float32 rows :func:`aecompress.core.groups.extract_rows`
takes from a loaded model.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.formats.sources import ModelClass, auto_class, auto_class_name, resolve

log = logging.getLogger(__name__)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class TensorFiles:
    """Where each tensor of a safetensors checkpoint lives: one file, or shards listed by an index.

    Args:
        directory: a local checkpoint directory with ``model.safetensors`` or
            ``model.safetensors.index.json``.

    Raises:
        AECompressError: if the index is unreadable or names a shard that is not there.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        self.sharded = index.is_file()
        if self.sharded:
            try:
                self.weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
                raise AECompressError(f"cannot read the shard index {str(index)!r}: {err}") from err
        else:
            with safe_open(str(self.directory / SINGLE), framework="pt") as fh:
                self.weight_map = dict.fromkeys(fh.keys(), SINGLE)
        for shard in self.shards():
            if not (self.directory / shard).is_file():
                raise AECompressError(f"shard {shard!r} named in {str(index)!r} is missing from {str(self.directory)!r}")

    @staticmethod
    def find(directory: str | Path) -> TensorFiles | None:
        """The tensor files of a local directory, or None if it holds no safetensors checkpoint."""
        directory = Path(directory)
        if not directory.is_dir() or not ((directory / INDEX).is_file() or (directory / SINGLE).is_file()):
            return None
        return TensorFiles(directory)

    def shards(self) -> list[str]:
        """File names in index order, each once."""
        return list(dict.fromkeys(self.weight_map.values()))

    def keys_in(self, shard: str) -> list[str]:
        """The tensors stored in one shard, as the file lists them."""
        with safe_open(str(self.directory / shard), framework="pt") as fh:
            return list(fh.keys())

    def key_for(self, param: str, prefix: str = "") -> str | None:
        """The checkpoint key of a model parameter, allowing for the base-model prefix."""
        candidates = [param]
        if prefix:
            candidates += [param.removeprefix(f"{prefix}."), f"{prefix}.{param}"]
        return next((k for k in candidates if k in self.weight_map), None)

    def read_one(self, shard: str, key: str) -> torch.Tensor:
        """One tensor of one shard, the file mapped only while it is read (its pages are not kept resident)."""
        with safe_open(str(self.directory / shard), framework="pt") as fh:
            return fh.get_tensor(key)

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read these tensors (and nothing else), opening each shard once."""
        by_shard: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_shard[self.weight_map[key]].append(key)
        out = {}
        for shard, names in by_shard.items():
            with safe_open(str(self.directory / shard), framework="pt") as fh:
                for name in names:
                    out[name] = fh.get_tensor(name)
        return out


def skeleton(source: str, cls_name: str, trust_remote_code: bool = False) -> nn.Module:
    """The model built from its config on the meta device: names, shapes and module types, no weights."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = auto_class(cls_name).from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return model.eval()


def open_lazy(
    name: str, model_class: ModelClass = "auto", trust_remote_code: bool = False
) -> tuple[nn.Module, TensorFiles, str, str] | None:
    """The skeleton and tensor files of a local safetensors checkpoint, or None if it is not one.

    Returns:
        ``(skeleton, files, source, auto class name)``, or None when the model
        is a hub id or a directory without safetensors weights (then the
        caller loads the full model).
    """
    source = resolve(name)
    files = TensorFiles.find(source)
    if files is None:
        log.info("%s is not a local safetensors checkpoint; loading the full model", source)
        return None
    cls_name = auto_class_name(source, model_class, trust_remote_code)
    return skeleton(source, cls_name, trust_remote_code), files, source, cls_name


def checkpoint_keys(model: nn.Module, files: TensorFiles, params: Iterable[str]) -> dict[str, str] | None:
    """Parameter name -> checkpoint key for every name, or None if one is not in the checkpoint."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    keys = {p: files.key_for(p, prefix) for p in params}
    return None if any(k is None for k in keys.values()) else keys  # type: ignore[return-value]


def read_rows(model: nn.Module, files: TensorFiles, group: WeightGroup) -> torch.Tensor:
    """A group's rows as a new float32 (rows x width) tensor, read from the files alone."""
    keys = checkpoint_keys(model, files, [m.param for m in group.members])
    if keys is None:
        raise AECompressError(f"group {group.name!r} has a weight that {str(files.directory)!r} does not hold")
    tensors = files.read(dict.fromkeys(keys.values()))
    params = dict(model.named_parameters())
    rows = []
    for member in group.members:
        tensor = tensors[keys[member.param]]
        if tuple(tensor.shape) != tuple(params[member.param].shape):
            raise AECompressError(
                f"{keys[member.param]!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                f"the model's config expects {tuple(params[member.param].shape)}"
            )
        rows.append(member.view(tensor).float())
    return torch.cat(rows).clone()
