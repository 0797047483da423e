"""Shared by the peer scripts, which run in each peer's own environment (never in aecompress's).

Every peer script leaves, under its ``--out`` directory:

- ``native/``: the peer's own quantized checkpoint, as its package saves it;
- ``dense/``: the peer's dequantized weights in the original architecture (float32,
  ``save_pretrained``), so plain transformers loads it and aecompress evaluates it;
- ``aecompress-peer.json``: for every weight the peer compressed (by its parameter name), the
  tensors its own checkpoint stores for it (names, shapes, dtypes, read from ``native/``), so
  aecompress's accountant counts the peer's real size; plus the peer, version and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open


def block_linears(model: torch.nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules inside numbered transformer blocks (attention and MLP)."""
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and ("layers" in parts or "layer" in parts) and any(p.isdigit() for p in parts):
            names.append(name)
    return names


def windows(tokenizer, path: str, count: int, length: int, encoder: bool) -> list[list[int]]:
    """Up to ``count`` windows of ``length`` tokens from the start of the calibration text."""
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    body = length - 2 if encoder else length
    out = []
    for i in range(min(count, len(ids) // body)):
        chunk = ids[i * body : (i + 1) * body]
        out.append([tokenizer.cls_token_id, *chunk, tokenizer.sep_token_id] if encoder else chunk)
    return out


def gptq_arguments(description: str, length: int) -> argparse.Namespace:
    """The GPTQ scripts' command line (both packages take the same settings); ``length``: tokens per window."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="a local float32 checkpoint directory")
    parser.add_argument("--bits", type=int, required=True, choices=[2, 3, 4, 8])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calibration", required=True, help="a UTF-8 text file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--length", type=int, default=length)
    return parser.parse_args()


def calibration_rows(tokenizer, args: argparse.Namespace, encoder: bool) -> list[dict]:
    """The calibration windows as the rows both GPTQ packages take (every token attended)."""
    return [{"input_ids": w, "attention_mask": [1] * len(w)}
            for w in windows(tokenizer, args.calibration, args.windows, args.length, encoder=encoder)]


def stored_tensors(native: Path, modules: list[str]) -> dict[str, list[dict]]:
    """For each compressed module's weight, what the peer's own safetensors files store for it (bias excluded)."""
    wanted = set(modules)
    out: dict[str, list[dict]] = {f"{m}.weight": [] for m in modules}
    for file in sorted(native.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                module, _, field = key.rpartition(".")
                if module in wanted and field != "bias":
                    piece = fh.get_slice(key)
                    out[f"{module}.weight"].append({"name": field, "shape": list(piece.get_shape()),
                                                    "dtype": _dtype(piece.get_dtype())})
    missing = [k for k, v in out.items() if not v]
    if missing:
        raise SystemExit(f"the peer's checkpoint in {native} stores nothing for {missing[0]}")
    return out


def _dtype(name: str) -> str:
    return {"I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "F16": "float16",
            "BF16": "bfloat16", "F32": "float32"}[name]


def write_dense(model: torch.nn.Module, tokenizer, source: str, out: Path) -> None:
    """The dequantized model in the original architecture, with the source's tokenizer and small files."""
    dense = out / "dense"
    shutil.rmtree(dense, ignore_errors=True)
    model.save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    for item in Path(source).iterdir():
        target = dense / item.name
        if not target.exists() and not item.name.endswith((".safetensors", ".bin")) and item.name != "aecompress-cache.json":
            (shutil.copytree if item.is_dir() else shutil.copy)(item, target)


def write_manifest(out: Path, stored: dict[str, list[dict]], started: float, **info) -> None:
    """``aecompress-peer.json``: what ``method: external`` reads."""
    data = {"dense": "dense", **info, "seconds": round(time.time() - started, 1), "stored": stored}
    (out / "aecompress-peer.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(f"{out}: {len(stored)} weights, {data['seconds']} s")


def offline() -> None:
    """No hub: every model and file comes from a local directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
