"""The compact export: each group's stored form, the untouched weights and the sidecar, with checksums.

It keeps exactly what the budget counts. Reload goes config -> empty model -> remaining
weights -> decoded groups. The model code comes from transformers, never from the artifact:
the sidecar may only name an Auto class and a method from fixed tables, and both checksums
must match before any tensor is used. The run-time form (weights decoded just in time) is
built on :func:`open_compact` by :mod:`aecompress.runtime`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from aecompress.blocks.base import check_fields
from aecompress.core.errors import AECompressError
from aecompress.core.files import atomic_directory, check_target, sha256
from aecompress.core.groups import WeightGroup, assign_rows
from aecompress.core.stored import StoredForm
from aecompress.formats import card, sidecar
from aecompress.formats.extras import copy_aux_files
from aecompress.formats.lazy import TensorFiles
from aecompress.formats.manifest import write_manifest
from aecompress.formats.sidecar import COMPRESSED, MANIFEST, REMAINING, SIDECAR
from aecompress.formats.sources import auto_class
from aecompress.formats.streaming import write_from_files
from aecompress.formats.substitute import decode_all
from aecompress.methods import METHODS

log = logging.getLogger(__name__)


def _remaining_state(model: nn.Module, forms: dict[str, StoredForm]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weights not fully covered by a group, with tied duplicates dropped (on a skeleton: tied by being one tensor)."""
    whole = {m.param for f in forms.values() for m in f.group.members if m.parts == 1}
    state = model.state_dict(keep_vars=True)

    def where(tensor: torch.Tensor) -> int:
        return id(tensor) if tensor.is_meta else tensor.data_ptr()

    dropped_ptrs = {where(state[p]) for p in whole}
    remaining, dropped, seen = {}, [], set()
    for name, tensor in state.items():
        key = (where(tensor), tuple(tensor.shape), tensor.stride())
        if name in whole or where(tensor) in dropped_ptrs or key in seen:
            dropped.append(name)
            continue
        seen.add(key)
        remaining[name] = tensor.detach().contiguous()
    return remaining, dropped


def export_compact(
    model: nn.Module, forms: dict[str, StoredForm], source: str, auto_class: str, model_name: str,
    out_dir: str, overwrite: bool = False, card_info: dict | None = None, files: TensorFiles | None = None,
) -> Path:
    """Write stored forms + remaining weights + sidecar, with checksums, and the manifest of every file.

    Every form is decoded once first: one that does not decode to finite numbers is refused before anything is written.
    With ``files`` (``model`` is then a skeleton), the remaining weights are read from them one at a time.
    """
    check_target(Path(out_dir), overwrite)
    for form in forms.values():
        decode_all([form])
    compressed = {f"{name}/{k}": t.contiguous() for name, f in forms.items() for k, t in f.tensors.items()}
    remaining, dropped = _remaining_state(model, forms)
    with atomic_directory(out_dir, overwrite) as tmp:
        copy_aux_files(source, tmp)
        model.config.save_pretrained(tmp)
        save_file(compressed, tmp / COMPRESSED, metadata={"format": "aecompress-compact"})
        if files is None:
            save_file(remaining, tmp / REMAINING, metadata={"format": "aecompress-compact"})
        else:
            write_from_files(tmp / REMAINING, model, files, remaining, {"format": "aecompress-compact"})
        meta = sidecar.build(forms, model, auto_class, "compact", model_name)
        meta["dropped"] = dropped
        meta["checksums"] = {COMPRESSED: sha256(tmp / COMPRESSED), REMAINING: sha256(tmp / REMAINING)}
        meta["manifest"] = MANIFEST
        sidecar.write(tmp, meta)
        card.write(tmp, meta, source, {**(card_info or {}), "directory_name": Path(out_dir).name})
        write_manifest(tmp, meta["checksums"])  # last: it covers every file above, the sidecar included
    log.info("wrote compact model to %s", out_dir)
    return Path(out_dir)


def verified_tensors(directory: Path, name: str, expected: str | None) -> dict[str, torch.Tensor]:
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
        if method not in METHODS:
            raise AECompressError(
                f"group {group.name!r} asks for unknown method {method!r}; valid: {', '.join(METHODS)}"
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
        form = StoredForm(method, group, tensors, entry.get("meta", {}))
        check_fields(form)
        forms.append(form)
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


def _no_init():
    """transformers' context that builds a model without writing initial values (nothing, where it has none)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers before 5
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def open_compact(directory: str | Path) -> tuple[nn.Module, list[StoredForm]]:
    """The architecture with its remaining weights loaded, and every group's stored form, all checked.

    The compressed groups' weights in the returned model are still the random ones of a fresh model.
    """
    directory = Path(directory)
    meta = sidecar.read_compact(directory)
    checksums = meta.get("checksums", {})
    compressed = verified_tensors(directory, COMPRESSED, checksums.get(COMPRESSED))
    remaining = verified_tensors(directory, REMAINING, checksums.get(REMAINING))
    forms = stored_forms(meta, compressed)
    try:
        config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError) as err:  # never remote code: an unknown model type is refused
        raise AECompressError(f"cannot read {str(directory / 'config.json')!r}: {str(err).strip()[:300]}") from err
    # Every weight is loaded below or replaced by its stored form, so no random values are written: the pages of
    # the compressed matrices are never touched by the run-time form (SmolLM2: 538 MB less at the peak of loading).
    with _no_init():
        model = auto_class(meta["auto_class"]).from_config(config, dtype=torch.float32)
    model.tie_weights()  # skipped with the initialization; the tied head must be the embedding, as from_config makes it
    check_remaining(model.state_dict(), remaining, meta.get("dropped", []))
    model.load_state_dict(remaining, strict=False)
    check_members(model, forms)
    return model, forms


def load_compact(directory: str | Path, cache: bool | int = False) -> nn.Module:
    """Rebuild the transformers model from a compact export, every compressed weight decoded to full size.

    Args:
        directory: a directory written by ``aecompress export --format compact``.
        cache: only for the run-time form (``aecompress.load_compact(..., materialize=False)``).

    Returns:
        The model in eval mode; its weights are ``torch.equal`` to the decoded export's.
    """
    if cache:
        raise AECompressError(f"cache={cache!r} applies only to the run-time form; pass materialize=False with it")
    model, forms = open_compact(directory)
    for group, rows in decode_all(forms).items():
        assign_rows(model, group, rows)
    return model.eval()
