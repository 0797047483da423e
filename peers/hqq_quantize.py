"""HQQ (half-quadratic quantization) through the real ``hqq`` package (CPU, data-free); run by ``hqq.sh``.

Every ``nn.Linear`` of the transformer blocks becomes an ``HQQLinear`` with the package's
defaults but ``--bits`` and ``--group-size`` (axis 1, float16 scale and zero per group). The
weights HQQ's own dequantizer gives (in float32) are the dense checkpoint; the model holding
the ``HQQLinear`` modules is saved as HQQ stores it (its ``save_to_safetensors``; where that
refuses tied embeddings, the same state dict without the tied duplicate).
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import block_linears, offline, stored_tensors, write_dense, write_manifest  # noqa: E402

offline()

import torch  # noqa: E402
from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear, Quantizer  # noqa: E402
from hqq.models.hf.base import AutoHQQHFModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def dequantized(layer: HQQLinear) -> torch.Tensor:
    """HQQ's own dequantization, in float32 (its stored scale and zero widen exactly)."""
    meta = {**layer.meta, "compute_dtype": torch.float32}
    meta["scale"], meta["zero"] = meta["scale"].float(), meta["zero"].float()
    return Quantizer.dequantize(layer.W_q.data, meta).float()


def save_native(model: torch.nn.Module, native: Path) -> None:
    """HQQ's own save; where it refuses tied weights, the same state dict with the tied copy dropped."""
    try:
        AutoHQQHFModel.save_to_safetensors(model, str(native), verbose=False)
    except RuntimeError as err:
        if "share memory" not in str(err):
            raise
        native.mkdir(parents=True, exist_ok=True)
        seen, tensors = set(), {}
        for key, value in model.state_dict().items():
            ident = (value.data_ptr(), value.numel(), value.dtype)
            if value.numel() and ident in seen:
                continue
            seen.add(ident)
            tensors[key] = value.detach().cpu().contiguous()
        save_file(tensors, str(native / "model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local float32 checkpoint directory")
    parser.add_argument("--bits", type=int, required=True, choices=[1, 2, 3, 4, 8])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    causal = any("CausalLM" in a for a in (AutoConfig.from_pretrained(args.model).architectures or []))
    auto = AutoModelForCausalLM if causal else AutoModel
    model = auto.from_pretrained(args.model, dtype=torch.float32).eval()
    config = BaseQuantizeConfig(nbits=args.bits, group_size=args.group_size)
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    modules = block_linears(model)
    dense = {}
    with torch.no_grad():
        for name in modules:
            layer = HQQLinear(model.get_submodule(name), config, compute_dtype=torch.float16, device="cpu", del_orig=False)
            dense[name] = dequantized(layer)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    AutoHQQHFModel.autoname_modules(model)
    save_native(model, out / "native")
    plain = auto.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, weight in dense.items():
            plain.get_submodule(name).weight.copy_(weight)
    write_dense(plain, AutoTokenizer.from_pretrained(args.model), args.model, out)
    write_manifest(out, stored_tensors(out / "native", modules), started, peer="hqq", peer_version=version("hqq"),
                   method="hqq", bits=args.bits, group_size=args.group_size, axis=1)


if __name__ == "__main__":
    main()
