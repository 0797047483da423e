"""Which weight matrices a run compresses: module types derived from the model itself.

Every 2-D weight inside a numbered block (``model.layers.3.self_attn.k_proj.weight``) has a
*module type*: its path with the block and the layer index removed (``self_attn.k_proj``).
A 2-D weight outside the blocks (an embedding, an LM head) is typed by its module's own name
(``embed_tokens``). Nothing is looked up in a table of families, so any architecture
``transformers`` builds works: a user names a type in full, by a unique dotted suffix
(``k_proj``), by a friendly alias, or by fnmatch patterns over parameter names.

Friendly aliases keep the names earlier configs and checkpoints use:

- ``query``, ``key``, ``value``, ``attention_output``, ``intermediate``, ``output``,
  ``mlp_fc``, ``mlp_proj`` name BERT's and GPT-2's types (the parts of GPT-2's fused
  ``c_attn`` included); on a model with ``q_proj``-style names, ``query``, ``key`` and
  ``value`` stand for ``q_proj``, ``k_proj`` and ``v_proj``.
- ``attention`` and ``mlp`` expand to every block type of that kind (a type is attention
  when a part of its path says ``attn`` or ``attention``), ``all`` to both.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.core.groups import Member, WeightGroup

Mode = Literal["concatenated", "separated"]

_BLOCK = re.compile(r"(^|\.)(?P<layer>\d+)\.")

# Friendly name -> candidates: (module type, fused part, fused parts) or another name to resolve.
# The first candidate the model has is used; the group keeps the friendly name.
FRIENDLY: dict[str, tuple[tuple[str, int, int] | str, ...]] = {
    "query": (("attention.self.query", 0, 1), ("attn.c_attn", 0, 3), "q_proj"),
    "key": (("attention.self.key", 0, 1), ("attn.c_attn", 1, 3), "k_proj"),
    "value": (("attention.self.value", 0, 1), ("attn.c_attn", 2, 3), "v_proj"),
    "attention_output": (("attention.output.dense", 0, 1), ("attn.c_proj", 0, 1)),
    "intermediate": (("intermediate.dense", 0, 1),),
    "output": (("output.dense", 0, 1),),
    "mlp_fc": (("mlp.c_fc", 0, 1),),
    "mlp_proj": (("mlp.c_proj", 0, 1),),
}
# Architectures whose per-kind names are friendly aliases, recognised by a type they have.
_NAMED_KINDS = {
    "attention.self.query": {"attention": ("query", "key", "value", "attention_output"), "mlp": ("intermediate", "output")},
    "attn.c_attn": {"attention": ("query", "key", "value", "attention_output"), "mlp": ("mlp_fc", "mlp_proj")},
}
KINDS = ("attention", "mlp", "all")


@dataclass(frozen=True)
class Weight:
    """One 2-D weight of the model, with its derived module type."""

    param: str
    module_type: str
    layer: int | None
    transposed: bool


def _is_conv1d(module: nn.Module) -> bool:
    # Checked by name so that any Conv1D-style class (transformers' pytorch_utils.Conv1D) is caught.
    return type(module).__name__ == "Conv1D"


def _owner(model: nn.Module, param: str) -> nn.Module:
    return model.get_submodule(param.rsplit(".", 1)[0]) if "." in param else model


def _split(name: str) -> tuple[str, str, int | None]:
    """``(container, type, layer)`` of a parameter name; container is "" outside numbered blocks."""
    owner = name.removesuffix(".weight") if name.endswith(".weight") else name
    found = _BLOCK.search(owner)
    if found is None:
        return "", owner.rsplit(".", 1)[-1], None
    return owner[: found.start("layer")].rstrip("."), owner[found.end() :], int(found["layer"])


def weights(model: nn.Module) -> list[Weight]:
    """Every 2-D parameter with its module type, in the model's order.

    Two containers of blocks holding the same type (an encoder and a decoder), or two
    embeddings with one name, are told apart by their container's path.
    """
    found = [(n, *_split(n)) for n, p in model.named_parameters() if p.dim() == 2]
    containers: dict[str, set[str]] = {}
    for name, container, kind, layer in found:
        containers.setdefault(kind, set()).add(container if layer is not None else name)
    out = []
    for name, container, kind, layer in found:
        if len(containers[kind]) > 1:
            kind = f"{container}.{kind}" if container else name.removesuffix(".weight")
        out.append(Weight(name, kind, layer, _is_conv1d(_owner(model, name))))
    return out


def module_types(model: nn.Module) -> list[str]:
    """The model's module types, in order of first appearance."""
    return list(dict.fromkeys(w.module_type for w in weights(model)))


def block_types(model: nn.Module) -> list[str]:
    """The module types that live inside numbered blocks (attention and MLP weights)."""
    return list(dict.fromkeys(w.module_type for w in weights(model) if w.layer is not None))


def is_attention(module_type: str) -> bool:
    """Whether a block type belongs to attention: some part of its path says ``attn`` or ``attention``."""
    return any("attn" in part.lower() or "attention" in part.lower() for part in module_type.split("."))


def _short_names(types: list[str]) -> dict[str, str]:
    """Each type's shortest dotted suffix that no other type ends with (``self_attn.k_proj`` -> ``k_proj``)."""
    out = {}
    for kind in types:
        parts = kind.split(".")
        for size in range(1, len(parts) + 1):
            suffix = ".".join(parts[-size:])
            if sum(_ends_with(other, suffix) for other in types) == 1:
                out[kind] = suffix
                break
    return out


def _ends_with(kind: str, suffix: str) -> bool:
    return kind == suffix or kind.endswith("." + suffix)


def _canonical(name: str, types: list[str]) -> str:
    """A friendly name that stands for another name becomes it (``key`` is ``k_proj`` on a Llama)."""
    for candidate in FRIENDLY.get(name, ()):
        if isinstance(candidate, str) and any(_ends_with(t, candidate) for t in types):
            return candidate
        if not isinstance(candidate, str) and candidate[0] in types:
            return name
    return name


def expand(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Resolve ``attention``, ``mlp``, ``all`` and names that stand for others into the names of groups, in order."""
    types = module_types(model)
    named = next((v for k, v in _NAMED_KINDS.items() if k in types), None)
    short = _short_names(types)
    out: list[str] = []
    for name in names:
        kinds = ("attention", "mlp") if name == "all" else (name,) if name in KINDS else None
        if kinds is None:
            out.append(_canonical(name, types))
            continue
        for kind in kinds:
            if named is not None:
                out.extend(named[kind])
            else:
                blocks = [t for t in block_types(model) if is_attention(t) == (kind == "attention")]
                out.extend(short.get(t, t) for t in blocks)
    return list(dict.fromkeys(out))


def _resolve(model: nn.Module, name: str, seen: tuple[str, ...] = ()) -> list[Member] | None:
    """Members of one named type (friendly alias, full type or unique suffix), or None if it names none."""
    found = weights(model)
    types = list(dict.fromkeys(w.module_type for w in found))
    for candidate in FRIENDLY.get(name, ()):
        if isinstance(candidate, str):
            if candidate not in seen and (members := _resolve(model, candidate, (*seen, name))) is not None:
                return members
            continue
        kind, part, parts = candidate
        if kind in types:
            return [Member(w.param, w.layer, w.transposed, part, parts) for w in found if w.module_type == kind]
    matches = [t for t in types if _ends_with(t, name)]
    if len(matches) > 1 and name not in types:
        raise AECompressError(f"module type {name!r} is ambiguous; it could be {', '.join(matches)}")
    if not matches:
        return None
    kind = name if name in types else matches[0]
    return [Member(w.param, w.layer, w.transposed) for w in found if w.module_type == kind]


def _is_pattern(name: str) -> bool:
    return any(ch in name for ch in "*?[.")


def _first_int(name: str) -> int | None:
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def _match(model: nn.Module, name: str) -> list[Member]:
    """Members of one module type or fnmatch pattern over parameter names."""
    members = _resolve(model, name)
    if members is not None:
        return members
    if _is_pattern(name):
        return [Member(w.param, _first_int(w.param), w.transposed) for w in weights(model)
                if fnmatch.fnmatchcase(w.param, name)]
    short = _short_names(module_types(model))
    friendly = [f for f in FRIENDLY if _resolve(model, f) is not None]
    valid = [short.get(t, t) for t in module_types(model)] + friendly + list(KINDS)
    raise AECompressError(
        f"unknown module type {name!r} for {type(model).__name__}; valid: {', '.join(dict.fromkeys(valid))}, "
        "or fnmatch patterns over parameter names"
    )


def summarize_names(names: Iterable[str]) -> str:
    """Parameter names with layer numbers folded to ``*``, for error messages."""
    return ", ".join(sorted({re.sub(r"\.\d+\.", ".*.", n) for n in names}))


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
        model: the loaded transformers model (or its skeleton on the meta device).
        modules: module types (``self_attn.k_proj``, ``k_proj``, ``key``...), ``attention``,
            ``mlp``, ``all``, or fnmatch patterns over parameter names.
        mode: ``concatenated`` stacks a module type across layers, ``separated``
            makes one group per matrix.
        include: keep only parameters matching one of these patterns.
        exclude: drop parameters matching any of these patterns.
    """
    if mode not in ("concatenated", "separated"):
        raise AECompressError(f"unknown mode {mode!r}; valid: concatenated, separated")
    groups: list[WeightGroup] = []
    for module_type in expand(model, list(modules)):
        members = _filter(_match(model, module_type), include, exclude or [])
        if not members:
            raise AECompressError(
                f"module type or pattern {module_type!r} matches no weights; available 2-D "
                f"parameters: {summarize_names(w.param for w in weights(model))}"
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
