"""A model compressed by another package (GPTQ, HQQ...), measured by our evaluator at its honestly counted size.

Peers run through their own packages, in their own environments (see ``peers/``), and leave a
directory with two things: a dense checkpoint (``dense/``, the peer's own dequantized weights
in the original architecture, so any ``transformers`` loads it), and ``aecompress-peer.json``,
which lists, for every weight the peer compressed, the tensors its own quantized checkpoint
stores for it (codes, scales, zeros, group indices: names, shapes and dtypes read from that
file). The stored form here holds those tensors' shapes on the meta device, so the one
accountant counts exactly what the peer's format keeps; decoding reads the peer's dense rows.
Nothing of the peer's code runs here, and nothing is unpickled.

The manifest is not taken on trust: every tensor it lists must be in the peer's own checkpoint
(``native/``, as ``peers/common.py`` reads it: ``<module>.<name>`` beside ``<module>.weight``)
with the same shape and dtype, read from the safetensors headers without loading a tensor,
and every weight must store at least one non-empty tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from aecompress.blocks.base import GroupStats, Method, meta
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.files import safetensors_header
from aecompress.core.groups import WeightGroup
from aecompress.core.stored import StoredForm

MANIFEST = "aecompress-peer.json"
NATIVE = "native"
"""The peer's own quantized checkpoint, as its package saved it: what its size is counted from."""
DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
          "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def read_manifest(path: str | Path) -> dict:
    """A peer directory's manifest, checked for what this method reads."""
    manifest = Path(path) / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise AECompressError(f"{str(manifest)!r} cannot be read ({err}); write it with a script in peers/") from err
    if not isinstance(data.get("stored"), dict) or not isinstance(data.get("dense"), str):
        raise AECompressError(f"{str(manifest)!r} needs 'stored' (weight -> its stored tensors) and 'dense' (a directory)")
    return data


SAFETENSORS_DTYPES = {"I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "F16": "float16",
                      "BF16": "bfloat16", "F32": "float32"}
"""safetensors' dtype codes, named as the manifest names them (as ``peers/common.py`` writes them)."""


def native_tensors(path: str | Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor the peer's own checkpoint stores: name -> (dtype, shape), from the safetensors headers only."""
    native = Path(path) / NATIVE
    files = sorted(native.glob("*.safetensors")) if native.is_dir() else []
    if not files:
        raise AECompressError(f"the peer in {str(path)!r} has no native/ checkpoint (*.safetensors), so its size "
                              "cannot be established from its own files; write it with a script in peers/")
    out = {}
    for file in files:
        for name, info in safetensors_header(file).items():
            out[name] = (SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"]), info["shape"])
    return out


def _stored(entry, param: str, native: dict[str, tuple[str, list[int]]], path: str) -> dict[str, torch.Tensor]:
    """The tensors the manifest lists for one weight, each checked against the peer's native checkpoint."""
    tensors = entry if isinstance(entry, list) and all(isinstance(t, dict) for t in entry) else []
    out = {}
    for tensor in tensors:
        name, shape = tensor.get("name"), tensor.get("shape")
        dtype = DTYPES.get(tensor.get("dtype"))
        if dtype is None:
            raise AECompressError(f"{param}: stored tensor {name!r} has dtype {tensor.get('dtype')!r}; "
                                  f"valid: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise AECompressError(f"{param}: stored tensor {name!r} has shape {shape!r}, which is not a list of "
                                  "non-negative integers")
        key = f"{param.removesuffix('.weight')}.{name}"
        said = f"the peer's manifest in {path!r} says {param!r} stores {name} {tensor['dtype']} {shape}"
        if key not in native:
            raise AECompressError(f"{said}, but native/ holds no {key!r}; a peer's size is what native/ stores")
        if native[key] != (tensor["dtype"], shape):
            raise AECompressError(f"{said}, but native/ holds {native[key][0]} {native[key][1]}; "
                                  "a peer's size is what native/ stores")
        out[f"{param}/{name}"] = torch.empty(shape, dtype=dtype, device="meta")
    if not any(t.numel() for t in out.values()):
        raise AECompressError(f"the peer's manifest in {path!r} lists no stored tensors for {param!r} (or only empty "
                              "ones); a peer's size is what its own checkpoint stores")
    return out


def compress(group: WeightGroup, rows: torch.Tensor, target: Budget | None, stats: GroupStats | None = None, *,
             path: str = "") -> StoredForm:
    """The peer's stored tensors for the group's weights (shapes only), read from its manifest.

    Args:
        path: the peer's output directory (holding ``aecompress-peer.json`` and ``dense/``).
    """
    data = read_manifest(path)
    native = native_tensors(path)
    tensors: dict[str, torch.Tensor] = {}
    for member in group.members:
        entry = data["stored"].get(member.param)
        if entry is None:
            raise AECompressError(f"the peer in {path!r} did not compress {member.param!r}; it covers "
                                  f"{len(data['stored'])} weights")
        if member.parts != 1:
            raise AECompressError(f"{member.param!r} is part of a fused weight; a peer's size is per whole weight")
        tensors.update(_stored(entry, member.param, native, path))
    info = {k: v for k, v in data.items() if k not in ("stored", "dense")}
    return StoredForm("external", group, tensors, meta(target, 0, path=str(Path(path).resolve()), **info))


def _dense_files(directory: Path) -> dict[str, Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {k: directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = directory / "model.safetensors"
    with safe_open(str(single), framework="pt") as fh:
        return dict.fromkeys(fh.keys(), single)


@torch.no_grad()
def decode(stored: StoredForm) -> torch.Tensor:
    """The peer's own dequantized rows, read from its dense checkpoint."""
    data = read_manifest(stored.meta["path"])
    directory = Path(stored.meta["path"]) / data["dense"]
    files = _dense_files(directory)
    rows = []
    for member in stored.group.members:
        if member.param not in files:
            raise AECompressError(f"the peer's dense checkpoint {str(directory)!r} has no {member.param!r}")
        with safe_open(str(files[member.param]), framework="pt") as fh:
            rows.append(member.view(fh.get_tensor(member.param)).float())
    return torch.cat(rows)


METHOD = Method("external", decode=decode, compress=compress, budgeted=False)
