"""The decoded export, written shard by shard without ever holding the model.

:func:`export_streaming` walks the source checkpoint's safetensors files in
index order. For each shard it writes a file of the same name in which every
tensor is read, cast to float32 (as :func:`aecompress.formats.sources.load_model`
loads it), has its compressed rows replaced by decoded ones, and is written
out before the next one is read (:func:`write_safetensors`). Memory stays at
one tensor plus the decoded groups, whatever the model's size.

The output is byte for byte what :func:`aecompress.formats.decoded.export_decoded`
writes when the source was itself saved by ``save_pretrained`` from the same
architecture with the same ``max_shard_size``: same files, same tensor order,
same safetensors header, same index and ``config.json``. (``save_pretrained``
of a loaded model reshards with its own ``max_shard_size``; the streaming
export keeps the source's shards, and tensors the architecture does not
declare but the source holds are copied rather than dropped.)
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from aecompress.core.dtypes import FLOAT_DTYPES, FloatDtype
from aecompress.core.errors import AECompressError
from aecompress.core.files import atomic_directory, check_target
from aecompress.core.groups import Member
from aecompress.core.memory import give_back
from aecompress.core.stored import StoredForm
from aecompress.formats import card, sidecar
from aecompress.formats.extras import copy_aux_files
from aecompress.formats.lazy import INDEX, TensorFiles, checkpoint_keys
from aecompress.formats.substitute import decode_all

log = logging.getLogger(__name__)

Spec = tuple[str, torch.dtype, tuple[int, ...]]


def write_safetensors(path: Path, specs: list[Spec], metadata: dict[str, str], tensor: Callable[[str], torch.Tensor]) -> int:
    """Write a safetensors file one tensor at a time, byte-identical to ``safetensors.torch.save_file``.

    The header comes first, so it is built from names, dtypes and shapes alone.
    The tensor order and header layout are taken from safetensors itself (it is
    asked to serialize empty stand-ins of the same names and dtypes), so they
    follow whatever rule the installed version uses.

    Args:
        path: the file to write.
        specs: ``(name, dtype, shape)`` of every tensor.
        metadata: the header's ``__metadata__``.
        tensor: returns a tensor by name, when it is its turn to be written.

    Returns:
        The bytes of tensor data written.
    """
    shapes = {name: (dtype, tuple(shape)) for name, dtype, shape in specs}
    raw = safetensors_bytes({name: torch.empty(0, dtype=dtype) for name, dtype, _ in specs}, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    stand_in = json.loads(raw[8 : 8 + size].decode("utf-8"))
    order = [name for name in stand_in if name != "__metadata__"]
    header, offset = {}, 0
    if "__metadata__" in stand_in:
        header["__metadata__"] = stand_in["__metadata__"]
    for name in order:
        dtype, shape = shapes[name]
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": stand_in[name]["dtype"], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for name in order:
            dtype, shape = shapes[name]
            value = tensor(name)
            if value.dtype != dtype or tuple(value.shape) != shape:
                raise AECompressError(f"tensor {name!r} is {value.dtype} {tuple(value.shape)}, expected {dtype} {shape}")
            if value.numel():
                fh.write(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset


def _out_dtype(dtype: torch.dtype, floats: torch.dtype) -> torch.dtype:
    return floats if dtype.is_floating_point else dtype


def write_from_files(path: Path, model: nn.Module, files: TensorFiles, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str]) -> int:
    """Write ``tensors`` (a skeleton's: names, dtypes, shapes) with their values read from ``files`` one at a time,
    cast to their dtype as the loaded model holds them: the bytes ``save_file`` of the loaded model's tensors writes."""
    keys = checkpoint_keys(model, files, tensors)
    if keys is None:
        missing = next(n for n in tensors if checkpoint_keys(model, files, [n]) is None)
        raise AECompressError(f"{str(files.directory)!r} does not hold {missing!r}")

    def tensor(name: str) -> torch.Tensor:
        return files.read([keys[name]])[keys[name]].to(tensors[name].dtype)

    return write_safetensors(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], metadata, tensor)


class _Edits:
    """Decoded rows for each checkpoint tensor, decoded when that tensor is written.

    A group is decoded when the first of its tensors is reached and dropped once its last one is written, so memory
    holds one decoded group at a time (groups of one matrix, as block by block makes them) rather than all of them.
    """

    def __init__(self, model: nn.Module, files: TensorFiles, forms: dict[str, StoredForm]):
        params = dict(model.named_parameters())
        names = [m.param for f in forms.values() for m in f.group.members]
        keys = checkpoint_keys(model, files, names)
        if keys is None:
            missing = next(n for n in names if checkpoint_keys(model, files, [n]) is None)
            raise AECompressError(f"{str(files.directory)!r} does not hold {missing!r}; export with --stream false")
        for form in forms.values():  # a damaged form is refused before anything is written, one group at a time
            decode_all([form])
        self.members: dict[str, list[tuple[Member, StoredForm, int, int]]] = defaultdict(list)
        self.left: dict[str, int] = {}
        for form in forms.values():
            start = 0
            for member in form.group.members:
                count = member.view(params[member.param]).shape[0]
                self.members[keys[member.param]].append((member, form, start, count))
                start += count
            self.left[form.group.name] = len({keys[m.param] for m in form.group.members})
        self.decoded: dict[str, torch.Tensor] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.members

    def apply(self, key: str, value: torch.Tensor) -> None:
        """Write the decoded rows of every member stored in this tensor into it."""
        for member, form, start, count in self.members.get(key, []):
            name = form.group.name
            if name not in self.decoded:
                self.decoded[name] = decode_all([form])[form.group]
            member.view(value).copy_(self.decoded[name][start : start + count])
        for name in {form.group.name for _, form, _, _ in self.members.get(key, [])}:
            self.left[name] -= 1
            if not self.left[name]:
                self.decoded.pop(name, None)
                give_back()


def _write_configs(model: nn.Module, source: str, target: Path, dtype: FloatDtype) -> None:
    """``config.json`` and ``generation_config.json`` as ``save_pretrained`` of the loaded model writes them."""
    import transformers

    config = model.config
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(target)
    if model.can_generate():
        try:
            generation = transformers.GenerationConfig.from_pretrained(source)
        except OSError:
            generation = model.generation_config
        generation.save_pretrained(target)


def export_streaming(
    model: nn.Module, files: TensorFiles, forms: dict[str, StoredForm], source: str, auto_class: str,
    model_name: str, out_dir: str, overwrite: bool = False, card_info: dict | None = None,
    dtype: FloatDtype = "float32",
) -> Path:
    """Write the decoded export shard by shard from the source's safetensors files, floating weights in ``dtype``.

    Args:
        model: the model's skeleton (meta device is fine): names, shapes, config.
        files: the source checkpoint's tensor files.
        forms: the stored form of every compressed group.
        source: the resolved source directory (tokenizer and other files are copied).
        auto_class: the Auto class name, for the sidecar.
        model_name: the name the user gave, for the sidecar.
        out_dir: the directory to create (atomically).
        overwrite: replace ``out_dir`` if it exists.
        dtype: the floating weights' dtype (the decoded rows are written in float32 first, then cast).
    """
    check_target(Path(out_dir), overwrite)
    floats = FLOAT_DTYPES[dtype]
    edits = _Edits(model, files, forms)
    total = 0
    with atomic_directory(out_dir, overwrite) as tmp:
        copy_aux_files(source, tmp)
        _write_configs(model, source, tmp, dtype)
        for shard in files.shards():
            with safe_open(str(files.directory / shard), framework="pt") as fh:
                specs = []
                for key in fh.keys():
                    piece = fh.get_slice(key)
                    stored = getattr(torch, _TORCH_NAMES[piece.get_dtype()])
                    specs.append((key, _out_dtype(stored, floats), tuple(piece.get_shape())))

            def tensor(key: str, shard=shard) -> torch.Tensor:
                value = files.read_one(shard, key)  # the file is mapped only while one tensor is read
                if not value.dtype.is_floating_point:
                    return value
                value = value.to(torch.float32, copy=key in edits)
                edits.apply(key, value)
                return value.to(floats)

            total += write_safetensors(tmp / shard, specs, {"format": "pt"}, tensor)
        if files.sharded:
            index = {
                "metadata": {"total_parameters": model.num_parameters(), "total_size": total},
                "weight_map": files.weight_map,
            }
            (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        meta = {**sidecar.build(forms, model, auto_class, "decoded", model_name), "dtype": dtype}
        sidecar.write(tmp, meta)
        card.write(tmp, meta, source, {**(card_info or {}), "directory_name": Path(out_dir).name})
    log.info("streamed decoded model to %s", out_dir)
    return Path(out_dir)


# safetensors dtype names -> torch attribute names
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
