"""GPTQ through the real ``llm-compressor`` package (CPU), for encoders such as BERT; run by ``gptq.sh``.

gptqmodel has no BERT definition, so encoders go through llm-compressor's ``GPTQModifier``
(its sequential pipeline over the model's own block class), with its defaults but the bits and
group size. The quantized-dequantized weights it leaves in the model are the dense checkpoint;
``save_pretrained(save_compressed=True)`` writes its own format (packed codes, scales, zeros).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import block_linears, calibration_rows, gptq_arguments, offline, stored_tensors, write_dense, write_manifest  # noqa: E402

offline()

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402


def main() -> None:
    args = gptq_arguments(__doc__.splitlines()[0], length=256)
    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    started, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = calibration_rows(tokenizer, args, encoder=True)
    modules = block_linears(model)
    first = modules[0].split(".")
    block = type(model.get_submodule(".".join(first[: max(i for i, p in enumerate(first) if p.isdigit()) + 1])))
    scheme = QuantizationScheme(
        targets=["re:^(" + "|".join(m.replace(".", r"\.") for m in modules) + ")$"],
        weights=QuantizationArgs(num_bits=args.bits, type="int", strategy="group", group_size=args.group_size),
    )
    oneshot(model=model, tokenizer=tokenizer, dataset=Dataset.from_list(rows),
            recipe=GPTQModifier(config_groups={"group_0": scheme}), num_calibration_samples=len(rows),
            max_seq_length=args.length, pipeline="sequential", sequential_targets=[block.__name__],
            shuffle_calibration_samples=False)
    dense = {m: model.get_submodule(m).weight.detach().float().clone() for m in modules}
    model.save_pretrained(out / "native", save_compressed=True)
    plain = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, weight in dense.items():
            plain.get_submodule(name).weight.copy_(weight)
    write_dense(plain, tokenizer, args.model, out)
    write_manifest(out, stored_tensors(out / "native", modules), started, peer="llmcompressor",
                   peer_version=llmcompressor.__version__, method="gptq", bits=args.bits, group_size=args.group_size,
                   calibration_windows=len(rows), window=args.length)


if __name__ == "__main__":
    main()
