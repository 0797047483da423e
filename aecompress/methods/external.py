"""A model compressed by another package (GPTQ, HQQ...), measured by our evaluator at its honestly counted size.

Peers run through their own packages, in their own environments (see ``peers/``), and leave a
directory with two things: a dense checkpoint (``dense/``, the peer's own dequantized weights
in the original architecture, so any ``transformers`` loads it), and ``aecompress-peer.json``,
which lists, for every weight the peer compressed, the tensors its own quantized checkpoint
stores for it (codes, scales, zeros, group indices: names, shapes and dtypes read from that
file). The stored form here holds those tensors' shapes on the meta device, so the one
accountant counts exactly what the peer's format keeps; decoding reads the peer's dense rows.
Nothing of the peer's code runs here, and nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.stored import StoredForm
from aecompress.methods.base import GroupStats, Method, meta

MANIFEST = "aecompress-peer.json"
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


def _stored(entry: list[dict], param: str) -> dict[str, torch.Tensor]:
    out = {}
    for tensor in entry:
        dtype = DTYPES.get(tensor.get("dtype"))
        if dtype is None:
            raise AECompressError(f"{param}: stored tensor {tensor.get('name')!r} has dtype {tensor.get('dtype')!r}; "
                                  f"valid: {', '.join(DTYPES)}")
        out[f"{param}/{tensor['name']}"] = torch.empty([int(n) for n in tensor["shape"]], dtype=dtype, device="meta")
    return out


def compress(group: WeightGroup, rows: torch.Tensor, target: Budget | None, stats: GroupStats | None = None, *,
             path: str = "") -> StoredForm:
    """The peer's stored tensors for the group's weights (shapes only), read from its manifest.

    Args:
        path: the peer's output directory (holding ``aecompress-peer.json`` and ``dense/``).
    """
    data = read_manifest(path)
    tensors: dict[str, torch.Tensor] = {}
    for member in group.members:
        entry = data["stored"].get(member.param)
        if entry is None:
            raise AECompressError(f"the peer in {path!r} did not compress {member.param!r}; it covers "
                                  f"{len(data['stored'])} weights")
        if member.parts != 1:
            raise AECompressError(f"{member.param!r} is part of a fused weight; a peer's size is per whole weight")
        tensors.update(_stored(entry, member.param))
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
