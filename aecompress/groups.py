"""Which weight matrices are compressed, and how their rows are stacked.

A *member* is one weight matrix read in ``nn.Linear`` layout (out x in), so
every row is one output unit's weights. GPT-2's ``Conv1D`` stores the
transpose, and its fused ``c_attn`` holds query, key and value side by side;
a member records both facts so rows can be written back exactly.

A *group* is the data set one compressor sees: in ``concatenated`` mode the
members of one module type across all layers (one shared decoder), in
``separated`` mode a single member.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from aecompress.errors import AECompressError

Mode = Literal["concatenated", "separated"]

_LAYER = r"(?P<layer>\d+)"

# family -> module type -> (regex over parameter names, fused part index, fused part count)
PRESETS: dict[str, dict[str, tuple[str, int, int]]] = {
    "bert": {
        "word_embeddings": (r"(^|\.)embeddings\.word_embeddings\.weight$", 0, 1),
        "query": (rf"(^|\.)layer\.{_LAYER}\.attention\.self\.query\.weight$", 0, 1),
        "key": (rf"(^|\.)layer\.{_LAYER}\.attention\.self\.key\.weight$", 0, 1),
        "value": (rf"(^|\.)layer\.{_LAYER}\.attention\.self\.value\.weight$", 0, 1),
        "attention_output": (rf"(^|\.)layer\.{_LAYER}\.attention\.output\.dense\.weight$", 0, 1),
        "intermediate": (rf"(^|\.)layer\.{_LAYER}\.intermediate\.dense\.weight$", 0, 1),
        "output": (rf"(^|\.)layer\.{_LAYER}\.output\.dense\.weight$", 0, 1),
    },
    "gpt2": {
        "wte": (r"(^|\.)wte\.weight$", 0, 1),
        "query": (rf"(^|\.)h\.{_LAYER}\.attn\.c_attn\.weight$", 0, 3),
        "key": (rf"(^|\.)h\.{_LAYER}\.attn\.c_attn\.weight$", 1, 3),
        "value": (rf"(^|\.)h\.{_LAYER}\.attn\.c_attn\.weight$", 2, 3),
        "attention_output": (rf"(^|\.)h\.{_LAYER}\.attn\.c_proj\.weight$", 0, 1),
        "mlp_fc": (rf"(^|\.)h\.{_LAYER}\.mlp\.c_fc\.weight$", 0, 1),
        "mlp_proj": (rf"(^|\.)h\.{_LAYER}\.mlp\.c_proj\.weight$", 0, 1),
    },
    "llama": {
        "embed_tokens": (r"(^|\.)embed_tokens\.weight$", 0, 1),
        **{
            name: (rf"(^|\.)layers\.{_LAYER}\.{block}\.{name}\.weight$", 0, 1)
            for block, names in (
                ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                ("mlp", ("gate_proj", "up_proj", "down_proj")),
            )
            for name in names
        },
    },
}

# Shorthands that expand to several module types of a family.
ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "bert": {
        "attention": ("query", "key", "value", "attention_output"),
        "mlp": ("intermediate", "output"),
    },
    "gpt2": {
        "attention": ("query", "key", "value", "attention_output"),
        "mlp": ("mlp_fc", "mlp_proj"),
    },
    "llama": {
        "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "mlp": ("gate_proj", "up_proj", "down_proj"),
    },
}

# Common aliases so one config reads the same across families.
_FAMILY_NAMES = {"key": {"llama": "k_proj"}, "query": {"llama": "q_proj"}, "value": {"llama": "v_proj"}}

FAMILIES = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "electra": "bert",
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
}


@dataclass(frozen=True)
class Member:
    """One weight matrix (or one fused part of it) in ``nn.Linear`` layout."""

    param: str
    layer: int | None
    transposed: bool
    part: int = 0
    parts: int = 1

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The (out x in) view of this member inside the stored parameter."""
        matrix = tensor.t() if self.transposed else tensor
        size = matrix.shape[0] // self.parts
        return matrix[self.part * size : (self.part + 1) * size]


@dataclass(frozen=True)
class WeightGroup:
    """Rows from one or more members, compressed together by one compressor."""

    name: str
    module_type: str
    members: tuple[Member, ...]
    rows: int
    width: int

    def to_dict(self) -> dict:
        """A JSON-ready description, used in checkpoints' sidecars and links."""
        return {**asdict(self), "members": [asdict(m) for m in self.members]}

    @classmethod
    def from_dict(cls, data: dict) -> WeightGroup:
        """Inverse of :meth:`to_dict`."""
        members = tuple(Member(**m) for m in data["members"])
        return cls(data["name"], data["module_type"], members, int(data["rows"]), int(data["width"]))


def model_family(model: nn.Module) -> str | None:
    """The preset family for a transformers model, or None if it has no preset."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return FAMILIES.get(model_type)


def _is_conv1d(module: nn.Module) -> bool:
    # Checked by name so that any Conv1D-style class (transformers' pytorch_utils.Conv1D) is caught.
    return type(module).__name__ == "Conv1D"


def _owner(model: nn.Module, param: str) -> nn.Module:
    return model.get_submodule(param.rsplit(".", 1)[0]) if "." in param else model


def _weight_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.dim() == 2]


def summarize_names(names: Iterable[str]) -> str:
    """Parameter names with layer numbers folded to ``*``, for error messages."""
    folded = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in names})
    return ", ".join(folded)


def _expand_modules(modules: list[str], family: str | None) -> list[str]:
    """Resolve aliases and cross-family names, keeping the user's order."""
    expanded: list[str] = []
    for name in modules:
        if family and name in ALIASES.get(family, {}):
            expanded.extend(ALIASES[family][name])
        elif family and name in _FAMILY_NAMES and family in _FAMILY_NAMES[name]:
            expanded.append(_FAMILY_NAMES[name][family])
        else:
            expanded.append(name)
    return list(dict.fromkeys(expanded))


def _is_pattern(name: str) -> bool:
    return any(ch in name for ch in "*?[.")


def _match_module(model: nn.Module, family: str | None, module_type: str) -> list[Member]:
    """Members of one module type: a preset name or an fnmatch pattern over parameter names."""
    names = _weight_names(model)
    if family and module_type in PRESETS[family]:
        regex, part, parts = PRESETS[family][module_type]
        found = [(n, re.search(regex, n)) for n in names]
        hits = [(n, m) for n, m in found if m]
        return [
            Member(n, _layer(m), _is_conv1d(_owner(model, n)), part, parts)
            for n, m in hits
        ]
    if _is_pattern(module_type):
        hits = [n for n in names if fnmatch.fnmatchcase(n, module_type)]
        return [Member(n, _first_int(n), _is_conv1d(_owner(model, n))) for n in hits]
    valid = sorted(PRESETS.get(family, {})) + sorted(ALIASES.get(family, {}))
    raise AECompressError(
        f"unknown module type {module_type!r} for model family {family or 'unknown'}; "
        f"valid: {', '.join(valid) or '(none: give fnmatch patterns over parameter names)'}"
    )


def _layer(match: re.Match) -> int | None:
    layer = match.groupdict().get("layer")
    return int(layer) if layer is not None else None


def _first_int(name: str) -> int | None:
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def _filter(members: list[Member], include: list[str] | None, exclude: list[str]) -> list[Member]:
    def keep(name: str) -> bool:
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in exclude)

    return [m for m in members if keep(m.param)]


def _rows_and_width(model: nn.Module, members: list[Member]) -> tuple[int, int]:
    params = dict(model.named_parameters())
    shapes = {m.param: tuple(m.view(params[m.param]).shape) for m in members}
    widths = {s[1] for s in shapes.values()}
    if len(widths) != 1:
        detail = ", ".join(f"{k}: {v}" for k, v in shapes.items())
        raise AECompressError(
            f"rows of different widths cannot be stacked in one group ({detail}); "
            "use mode=separated or select matrices of one shape"
        )
    return sum(s[0] for s in shapes.values()), widths.pop()


def select_groups(
    model: nn.Module,
    modules: list[str],
    mode: Mode = "concatenated",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> list[WeightGroup]:
    """Resolve module types and patterns into weight groups.

    Args:
        model: the loaded transformers model.
        modules: preset module types (``key``, ``k_proj``, ``mlp``...) or fnmatch
            patterns over parameter names.
        mode: ``concatenated`` stacks a module type across layers, ``separated``
            makes one group per matrix.
        include: keep only parameters matching one of these patterns.
        exclude: drop parameters matching any of these patterns.
    """
    if mode not in ("concatenated", "separated"):
        raise AECompressError(f"unknown mode {mode!r}; valid: concatenated, separated")
    family = model_family(model)
    groups: list[WeightGroup] = []
    for module_type in _expand_modules(list(modules), family):
        members = _filter(_match_module(model, family, module_type), include, exclude or [])
        if not members:
            raise AECompressError(
                f"module type or pattern {module_type!r} matches no weights; available 2-D "
                f"parameters: {summarize_names(_weight_names(model))}"
            )
        members.sort(key=lambda m: (m.layer if m.layer is not None else -1, m.param))
        if mode == "separated":
            for member in members:
                rows, width = _rows_and_width(model, [member])
                suffix = member.layer if member.layer is not None else member.param
                groups.append(WeightGroup(f"{module_type}.{suffix}", module_type, (member,), rows, width))
        else:
            rows, width = _rows_and_width(model, members)
            groups.append(WeightGroup(module_type, module_type, tuple(members), rows, width))
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise AECompressError(f"module types select the same group twice: {names}")
    return groups


def extract_rows(model: nn.Module, group: WeightGroup) -> torch.Tensor:
    """The group's rows as a new float32 (rows x width) tensor."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        return torch.cat([m.view(params[m.param]).detach().float() for m in group.members]).clone()


def assign_rows(model: nn.Module, group: WeightGroup, rows: torch.Tensor) -> None:
    """Write (rows x width) back into the group's parameters, in place."""
    if tuple(rows.shape) != (group.rows, group.width):
        raise AECompressError(
            f"group {group.name!r} expects rows of shape {(group.rows, group.width)}, got {tuple(rows.shape)}"
        )
    params = dict(model.named_parameters())
    start = 0
    with torch.no_grad():
        for member in group.members:
            target = member.view(params[member.param])
            target.copy_(rows[start : start + target.shape[0]].to(target.dtype))
            start += target.shape[0]


def substituted_params(model: nn.Module, decoded: dict[WeightGroup, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full parameter tensors with decoded rows in place, built without writing to the model.

    Differentiable in the decoded rows, for ``torch.func.functional_call``: the
    model itself keeps its original weights (the teacher), while the returned
    tensors carry the compressed ones (the student). Fused parameters touched by
    several groups (GPT-2's ``c_attn``) get every part replaced.
    """
    params = dict(model.named_parameters())
    pieces: dict[str, list[torch.Tensor]] = {}
    transposed: dict[str, bool] = {}
    for group, rows in decoded.items():
        start = 0
        for member in group.members:
            full = params[member.param]
            linear = full.t() if member.transposed else full
            size = linear.shape[0] // member.parts
            parts = pieces.setdefault(member.param, list(linear.detach().split(size)))
            parts[member.part] = rows[start : start + size].to(full.dtype)
            transposed[member.param] = member.transposed
            start += size
    return {name: torch.cat(parts).t() if transposed[name] else torch.cat(parts) for name, parts in pieces.items()}
