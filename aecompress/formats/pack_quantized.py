"""The compressed-tensors export: integer codes in ``pack-quantized`` layout, which transformers and vLLM load.

Forms whose rows are integer codes on one width (``quantize``, ``compensated`` with ``fill: false``) keep
exactly their codes, scales and zero codes; only the container changes. compressed-tensors holds a
signed code ``q`` and zero point ``z`` in ``-2^(b-1) .. 2^(b-1) - 1`` and decodes ``scale * (q - z)``,
so our unsigned code and zero code are each shifted by ``2^(b-1)``, and its packer adds the shift back:
the packed words hold our codes as they are. The codes are packed by the library's own ``pack_to_int32``
and the config written by its own ``QuantizationConfig``, and before anything is written every matrix
is read back through its own decompressor and compared with our decode, so what is written is what the
library reads. Everything else (embeddings, norms, matrices not compressed) is written as the model has it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.core.files import atomic_directory, check_target
from aecompress.core.stored import StoredForm
from aecompress.formats import card, sidecar
from aecompress.formats.extras import copy_aux_files
from aecompress.formats.substitute import decode_all
from aecompress.methods import grid_codes

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
LAYOUT = "pack-quantized"


def _library():
    """compressed-tensors' packer, config and compressor, or one line saying how to install it."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as err:
        raise AECompressError(f"--format compressed-tensors needs the compressed-tensors package ({err}); "
                              "install it with: pip install 'aecompress[formats]'") from err
    return ModelCompressor, PackedQuantizationCompressor, pack_to_int32, QuantizationArgs, QuantizationConfig, \
        QuantizationScheme


def _linear_name(model: nn.Module, form: StoredForm, member) -> str:
    """The ``nn.Linear`` module a member is the whole weight of; compressed-tensors quantizes no other kind."""
    name = member.param.removesuffix(".weight")
    module = model.get_submodule(name) if member.param.endswith(".weight") else None
    if member.transposed or member.parts != 1 or not isinstance(module, nn.Linear):
        raise AECompressError(f"group {form.group.name!r}: {member.param!r} is not the whole weight of an nn.Linear "
                              "(compressed-tensors quantizes only those); drop it from --modules or use --format decoded")
    return name


def _args(codes) -> dict:
    """The quantization arguments of one code width and run length: asymmetric, per group of columns or per row."""
    strategy = {"strategy": "channel"} if codes.group_size is None else {"strategy": "group", "group_size": codes.group_size}
    return {"num_bits": codes.bits, "type": "int", "symmetric": False, **strategy}


def _module_state(codes, r0: int, rows: int, width: int, dtype: torch.dtype, pack) -> dict[str, torch.Tensor]:
    """One Linear's compressed tensors: our codes and zero codes shifted to signed, packed by the library."""
    shift = 2 ** (codes.bits - 1)
    scale = codes.scale[r0 : r0 + rows]
    if not torch.equal(scale.to(dtype).to(scale.dtype), scale):
        raise AECompressError(f"scales stored as {scale.dtype} do not fit the model's {dtype} exactly; "
                              "export a float32 model or use --format decoded")
    return {
        "weight_packed": pack((codes.codes[r0 : r0 + rows] - shift).to(torch.int8), codes.bits),
        "weight_scale": scale.to(dtype).contiguous(),
        "weight_zero_point": pack((codes.zero_codes[r0 : r0 + rows] - shift).to(torch.int8), codes.bits,
                                  packed_dim=0).contiguous(),
        "weight_shape": torch.tensor([rows, width]),
    }


def _checked(state: dict, scheme, decoded: torch.Tensor, name: str, compressor) -> None:
    """The library's own decompressor reads ``state`` back to our decoded rows, to float32 rounding."""
    read = compressor.decompress(dict(state), scheme)["weight"].float()
    bound = 4 * torch.finfo(torch.float32).eps * (2**scheme.weights.num_bits) * state["weight_scale"].float().abs().max()
    if read.shape != decoded.shape or not bool(((read - decoded).abs() <= bound).all()):
        raise RuntimeError(f"compressed-tensors reads {name!r} back differently from its stored form; nothing written")


def converted(model: nn.Module, forms: dict[str, StoredForm]) -> tuple[dict[str, torch.Tensor], object]:
    """Every compressed Linear's packed tensors (by full name) and the compressed-tensors config describing them."""
    ModelCompressor, Packed, pack, Args, Config, Scheme = _library()
    decoded = decode_all(forms.values())  # a damaged form is refused before anything is written
    state, schemes = {}, {}
    for form in forms.values():
        codes = grid_codes(form)
        r0, args = 0, _args(codes)
        scheme = Scheme(targets=["Linear"], weights=Args(**args), format=LAYOUT)
        for member in form.group.members:
            name = _linear_name(model, form, member)
            weight = model.get_submodule(name).weight
            rows = weight.shape[0]
            module = _module_state(codes, r0, rows, form.group.width, weight.dtype, pack)
            _checked(module, scheme, decoded[form.group][r0 : r0 + rows], name, Packed)
            state |= {f"{name}.{key}": tensor for key, tensor in module.items()}
            schemes.setdefault(tuple(sorted(args.items())), []).append(name)
            r0 += rows
    groups = {f"group_{i}": Scheme(targets=names, weights=Args(**dict(key))) for i, (key, names) in enumerate(schemes.items())}
    config = Config(config_groups=groups, format=LAYOUT, quantization_status="compressed")
    return state, ModelCompressor(quantization_config=config)


def _plain_state(model: nn.Module, packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights not compressed, as the model has them; a tied copy is written once, as ``save_pretrained`` does."""
    replaced = {name.rsplit(".", 1)[0] + ".weight" for name in packed}
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if name in replaced or key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def export_pack_quantized(
    model: nn.Module, forms: dict[str, StoredForm], source: str, auto_class: str, model_name: str,
    out_dir: str, overwrite: bool = False, card_info: dict | None = None,
) -> Path:
    """Write the model with each compressed Linear as compressed-tensors ``pack-quantized`` tensors, one safetensors file."""
    check_target(Path(out_dir), overwrite)
    packed, compressor = converted(model, forms)
    with atomic_directory(out_dir, overwrite) as tmp:
        copy_aux_files(source, tmp)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        save_file(_plain_state(model, packed) | packed, tmp / WEIGHTS, metadata={"format": "pt"})
        compressor.update_config(str(tmp))  # the library writes its own quantization_config into config.json
        meta = sidecar.build(forms, model, auto_class, "compressed-tensors", model_name)
        sidecar.write(tmp, meta)
        card.write(tmp, meta, source, {**(card_info or {}), "directory_name": Path(out_dir).name})
    log.info("wrote compressed-tensors model to %s", out_dir)
    return Path(out_dir)
