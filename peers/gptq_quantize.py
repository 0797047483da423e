"""GPTQ through the real ``gptqmodel`` package (CPU), for causal LMs; run by ``gptq.sh`` in gptqmodel's own environment.

Every ``nn.Linear`` of the decoder blocks is quantized by gptqmodel (its own choice of modules
for the model type), with the package's defaults but ``--bits`` and ``--group-size``, on
calibration windows of the same text aecompress calibrates on. The checkpoint gptqmodel saves
(format ``gptq``, v1: packed int32 codes, float16 scales, packed zeros, ``g_idx``) is decoded
exactly in float32 into ``dense/`` (gptqmodel's own dequantizer runs only in half precision).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import block_linears, calibration_rows, gptq_arguments, offline, stored_tensors, write_dense, write_manifest  # noqa: E402

offline()
# gptqmodel sizes a worker pool from the core count; on 2 cores its default asks for more than it has.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Codes of a GPTQ int32 bit stream along ``dim`` (code j holds bits ``bits*j .. bits*j+bits``)."""
    w = (words if dim == 0 else words.t()).to(torch.int64) & 0xFFFFFFFF
    rows, cols = w.shape
    stream = ((w.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1).reshape(rows * 32, cols)
    count = (rows * 32) // bits
    codes = (stream[: count * bits].reshape(count, bits, cols) << torch.arange(bits).view(1, bits, 1)).sum(1)
    return codes if dim == 0 else codes.t()


def zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """v1 zero points: gptqmodel subtracts 0x..0101 from each packed word (2, 4, 8 bits) or 1 per field (3 bits)."""
    if bits in (2, 4, 8):
        constant = sum(1 << (bits * j) for j in range(32 // bits))
        return unpack((qzeros.to(torch.int64) + constant) & 0xFFFFFFFF, bits, 1)[:, :out_features]
    return (unpack(qzeros, bits, 1)[:, :out_features] + 1) & ((1 << bits) - 1)


def decode(native: Path, module: str, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """One linear's weight ``[out, in]`` from gptqmodel's checkpoint, in float32."""
    out_f, in_f = shape
    found = {}
    for file in native.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            for field in ("qweight", "qzeros", "scales", "g_idx"):
                if f"{module}.{field}" in fh.keys():
                    found[field] = fh.get_tensor(f"{module}.{field}")
    q = unpack(found["qweight"], bits, 0)[:in_f]
    z = zeros(found["qzeros"], bits, out_f)
    g = found["g_idx"].long()
    return (found["scales"].float()[g] * (q.float() - z[g].float())).t().contiguous()


def main() -> None:
    args = gptq_arguments(__doc__.splitlines()[0], length=512)
    import gptqmodel
    from gptqmodel import GPTQConfig, GPTQModel

    started, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = calibration_rows(tokenizer, args, encoder=False)
    config = GPTQConfig(bits=args.bits, group_size=args.group_size, device="cpu")
    model = GPTQModel.load(args.model, config, dtype=torch.float32)
    model.quantize(calibration, batch_size=1)
    model.save(str(out / "native"))
    del model
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    native_keys = set()
    for file in (out / "native").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            native_keys |= {k.rsplit(".", 1)[0] for k in fh.keys() if k.endswith(".qweight")}
    modules = [m for m in block_linears(dense) if m in native_keys]
    with torch.no_grad():
        for name in modules:
            weight = dense.get_submodule(name).weight
            weight.copy_(decode(out / "native", name, args.bits, tuple(weight.shape)))
    write_dense(dense, tokenizer, args.model, out)
    write_manifest(out, stored_tensors(out / "native", modules), started, peer="gptqmodel",
                   peer_version=gptqmodel.__version__, method="gptq", bits=args.bits, group_size=args.group_size,
                   calibration_windows=len(calibration), window=args.length)


if __name__ == "__main__":
    main()
