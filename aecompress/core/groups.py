"""How the rows of weight matrices are stacked into groups, read and written back.

A *member* is one weight matrix read in ``nn.Linear`` layout (out x in), so
every row is one output unit's weights. GPT-2's ``Conv1D`` stores the
transpose, and its fused ``c_attn`` holds query, key and value side by side;
a member records both facts so rows can be written back exactly.

A *group* is the data set one compressor sees: in ``concatenated`` mode the
members of one module type across all layers (one shared decoder), in
``separated`` mode a single member. Which members a group gets is decided by
:mod:`aecompress.core.selection`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from aecompress.core.errors import AECompressError


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
