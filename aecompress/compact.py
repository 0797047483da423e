"""Reading a compact export back into a transformers model.

Reload goes config -> empty model -> remaining weights -> decoded groups.
The model code comes from transformers, never from the artifact: the sidecar
may only name an Auto class and a compression method from fixed registries,
and both checksums must match before any tensor is used.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from aecompress.errors import AECompressError
from aecompress.export import COMPRESSED, REMAINING, SIDECAR, SUPPORTED_VERSIONS, sha256
from aecompress.groups import WeightGroup, assign_rows
from aecompress.loading import auto_class, read_json
from aecompress.stored import DECODERS, StoredForm, decode


def read_sidecar(directory: Path) -> dict:
    """The compact sidecar, checked for format and version."""
    path = directory / SIDECAR
    if not path.is_file():
        raise AECompressError(f"{str(directory)!r} is not a compact aecompress export: no {SIDECAR}")
    meta = read_json(path)
    if meta.get("format") != "aecompress-compact":
        raise AECompressError(
            f"{str(directory)!r} holds format {meta.get('format')!r}, not a compact export; "
            "load a decoded export with transformers' from_pretrained"
        )
    if meta.get("format_version") not in SUPPORTED_VERSIONS:
        raise AECompressError(
            f"compact format version {meta.get('format_version')!r} is not supported (this aecompress reads "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade aecompress"
        )
    expected = {"groups": list, "auto_class": str, "checksums": dict}
    wrong = [key for key, kind in expected.items() if not isinstance(meta.get(key), kind)]
    if wrong:
        raise AECompressError(f"{str(path)!r} is damaged: {wrong[0]!r} is missing or not a {expected[wrong[0]].__name__}")
    return meta


def _verified_tensors(directory: Path, name: str, expected: str | None) -> dict[str, torch.Tensor]:
    path = directory / name
    if not path.is_file():
        raise AECompressError(f"compact export {str(directory)!r} is missing {name}")
    if expected is None:
        raise AECompressError(f"{SIDECAR} in {str(directory)!r} records no checksum for {name}; it cannot be verified")
    if sha256(path) != expected:
        raise AECompressError(f"checksum mismatch for {str(path)!r}: the file was changed after export")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise AECompressError(f"cannot read {str(path)!r}: {err}") from err


def stored_forms(meta: dict, compressed: dict[str, torch.Tensor]) -> list[StoredForm]:
    """Rebuild each group's stored form, checking names, shapes and method."""
    forms = []
    for i, entry in enumerate(meta["groups"]):
        try:
            group = WeightGroup.from_dict(entry["group"])
            method = entry["method"]
            described = {key: (list(info["shape"]), info.get("dtype")) for key, info in entry["tensors"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise AECompressError(f"{SIDECAR} group entry {i} is damaged: {type(err).__name__} {err}") from err
        if method not in DECODERS:
            raise AECompressError(
                f"group {group.name!r} asks for unknown method {method!r}; valid: {', '.join(sorted(DECODERS))}"
            )
        tensors = {}
        for key, (shape, dtype) in described.items():
            full = f"{group.name}/{key}"
            if full not in compressed:
                raise AECompressError(f"compact export is missing tensor {full!r}")
            if list(compressed[full].shape) != shape:
                raise AECompressError(
                    f"tensor {full!r} has shape {list(compressed[full].shape)}, sidecar says {shape}"
                )
            found = str(compressed[full].dtype).removeprefix("torch.")
            if dtype is not None and dtype != found:
                raise AECompressError(f"tensor {full!r} has dtype {found}, sidecar says {dtype}")
            tensors[key] = compressed[full]
        forms.append(StoredForm(method, group, tensors, entry.get("meta", {})))
    return forms


def check_members(model: nn.Module, forms: list[StoredForm]) -> None:
    """Every group's members exist in the model and stack to exactly the group's rows x width."""
    params = dict(model.named_parameters())
    for form in forms:
        group = form.group
        for member in group.members:
            if member.param not in params:
                raise AECompressError(f"group {group.name!r} names {member.param!r}, which this model does not have")
        shapes = [tuple(m.view(params[m.param]).shape) for m in group.members]
        if sum(s[0] for s in shapes) != group.rows or any(s[1] != group.width for s in shapes):
            raise AECompressError(
                f"group {group.name!r} is {group.rows} x {group.width} in {SIDECAR}, but its matrices in this model are {shapes}"
            )


def check_remaining(own: dict[str, torch.Tensor], remaining: dict[str, torch.Tensor], dropped: list[str]) -> None:
    """The remaining weights are this architecture's, in its shapes, and with the dropped
    (compressed or tied) names they cover every weight it has."""
    for name, tensor in remaining.items():
        if name not in own:
            raise AECompressError(f"{REMAINING} holds {name!r}, which this architecture does not have")
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise AECompressError(f"tensor {name!r} has shape {tuple(tensor.shape)}, model expects {tuple(own[name].shape)}")
    missing = sorted(set(own) - set(remaining) - set(dropped))
    if missing:
        raise AECompressError(f"compact export lacks weights for {missing[:3]}")


def load_compact(directory: str | Path, materialize: bool = True, cache: bool | int = False) -> nn.Module:
    """Rebuild the transformers model from a compact export.

    Args:
        directory: a directory written by ``aecompress export --format compact``.
        materialize: ``True`` decodes every compressed weight to full size once;
            ``False`` returns the run-time form (see :mod:`aecompress.runtime`):
            modules that hold only latents, decoders, factors or codes and
            decode their weights each time they run. It trains in that form.
        cache: run-time form only: keep decoded weights between calls
            (``True``: all, an integer: at most that many bytes); off by default.

    Returns:
        The model in eval mode. Materialized, its weights are ``torch.equal`` to
        the decoded export's; in run-time form its outputs match to float tolerance.
    """
    directory = Path(directory)
    if materialize and cache:
        raise AECompressError(f"cache={cache!r} applies only to the run-time form; pass materialize=False with it")
    if not materialize:
        from aecompress.runtime import check_runtime_source

        check_runtime_source(directory)
    meta = read_sidecar(directory)
    checksums = meta.get("checksums", {})
    compressed = _verified_tensors(directory, COMPRESSED, checksums.get(COMPRESSED))
    remaining = _verified_tensors(directory, REMAINING, checksums.get(REMAINING))
    forms = stored_forms(meta, compressed)
    if not materialize:
        from aecompress.runtime import check_forms

        check_forms(forms)
    try:
        config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError) as err:  # never remote code: an unknown model type is refused
        raise AECompressError(f"cannot read {str(directory / 'config.json')!r}: {str(err).strip()[:300]}") from err
    model = auto_class(meta["auto_class"]).from_config(config, dtype=torch.float32)
    check_remaining(model.state_dict(), remaining, meta.get("dropped", []))
    model.load_state_dict(remaining, strict=False)
    check_members(model, forms)
    if not materialize:
        from aecompress.runtime import to_runtime

        return to_runtime(model, forms, cache).eval()
    for form in forms:
        assign_rows(model, form.group, decode(form))
    return model.eval()
