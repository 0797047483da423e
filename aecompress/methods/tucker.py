"""Tucker factorization of a stacked group: layers x rows x width, ``T ≈ G ×1 U1 ×2 U2 ×3 U3``.

A concatenated group of equal matrices is a third-order tensor; its Tucker form keeps a small
core ``G`` (``k1 x k2 x k3``) and one factor per mode: ``U1`` (layers x ``k1``) mixes the
layers, ``U2`` (rows x ``k2``) and ``U3`` (width x ``k3``) are bases shared by all of them.
Ranks are chosen from a truncated HOSVD (where the error left is exact: ``||T||² - ||G||²``)
to fit the budget with the least error, then refined by a few HOOI sweeps.
"""

from __future__ import annotations

import torch
from torch import nn

from aecompress.blocks.base import Built, GroupStats, Method, float_dtype, item_size, meta
from aecompress.core.budget import Budget, infeasible_bytes, largest_fitting
from aecompress.core.dtypes import FloatDtype
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.rowsource import RowSource, refer
from aecompress.core.stored import StoredForm

STEPS = 64
"""Rank candidates per layer rank: ``k2`` and ``k3`` grow together over this many steps."""


def _unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def _leading(t: torch.Tensor, mode: int, rank: int | None = None) -> torch.Tensor:
    """The leading left singular vectors of the tensor's unfolding along ``mode``."""
    u = torch.linalg.svd(_unfold(t, mode), full_matrices=False)[0]
    return u if rank is None else u[:, :rank]


def core_of(t: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, u3: torch.Tensor) -> torch.Tensor:
    """``T ×1 U1ᵀ ×2 U2ᵀ ×3 U3ᵀ``."""
    return torch.einsum("lrn,la,rb,nc->abc", t, u1, u2, u3)


def tensor_of(core: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, u3: torch.Tensor) -> torch.Tensor:
    """``G ×1 U1 ×2 U2 ×3 U3``, the layers x rows x width tensor."""
    return torch.einsum("abc,la,rb,nc->lrn", core, u1, u2, u3)


def _cost(ranks: tuple[int, int, int], shape: tuple[int, int, int], item: int) -> int:
    (k1, k2, k3), (layers, rows, width) = ranks, shape
    return (k1 * k2 * k3 + layers * k1 + rows * k2 + width * k3) * item


def _ranks_at(k1: int, step: int, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    _, rows, width = shape
    return k1, max(1, round(rows * step / STEPS)), max(1, round(width * step / STEPS))


def _choose(t: torch.Tensor, full: torch.Tensor, budget: int, item: int) -> tuple[int, int, int] | None:
    """The ranks that fit the budget with the least HOSVD error (``full``: the untruncated HOSVD core)."""
    shape = tuple(t.shape)
    best = None
    for k1 in range(1, shape[0] + 1):
        step = largest_fitting(lambda s, k1=k1: _cost(_ranks_at(k1, s, shape), shape, item), budget, STEPS)
        if step is None:
            continue
        ranks = _ranks_at(k1, step, shape)
        kept = float(full[: ranks[0], : ranks[1], : ranks[2]].pow(2).sum())
        if best is None or kept > best[0]:
            best = (kept, ranks)
    return None if best is None else best[1]


def compress(
    group: WeightGroup,
    rows: torch.Tensor,
    target: Budget,
    stats: GroupStats | None = None,
    *,
    iterations: int = 2,
    dtype: FloatDtype = "float32",
) -> StoredForm:
    """Tucker form of the group's members stacked as layers x rows x width, at the ranks that fit best.

    Args:
        iterations: HOOI sweeps after the truncated HOSVD (0: HOSVD alone).
        dtype: the stored dtype of the core and the factors.
    """
    store = float_dtype(dtype, group, "tucker")
    item, layers = item_size(store), len(group.members)
    if group.rows % layers or not isinstance(iterations, int) or iterations < 0:
        raise AECompressError(
            f"method 'tucker' needs a group of equal matrices and iterations >= 0; group {group.name!r} stacks "
            f"{group.rows} rows from {layers} matrices (iterations {iterations!r})"
        )
    t = rows.double().reshape(layers, group.rows // layers, group.width)
    budget = target.bytes(group.rows, group.width)
    factors = [_leading(t, mode) for mode in range(3)]
    ranks = _choose(t, core_of(t, *factors), budget, item)
    if ranks is None:
        raise infeasible_bytes(group.name, group.rows, group.width, target, _cost((1, 1, 1), tuple(t.shape), item),
                               f"tucker ranks (1, 1, 1) ({dtype})")
    factors = [f[:, :k] for f, k in zip(factors, ranks)]
    for _ in range(iterations):  # HOOI: each basis from the tensor projected on the other two
        for mode in range(3):
            others = [f if m != mode else torch.eye(t.shape[m], dtype=t.dtype) for m, f in enumerate(factors)]
            factors[mode] = _leading(core_of(t, *others), mode, ranks[mode])
    core = core_of(t, *factors)
    tensors = {"core": core.to(store).contiguous(), **{f"U{i + 1}": f.to(store).contiguous() for i, f in enumerate(factors)}}
    return StoredForm("tucker", group, tensors, meta(target, budget, ranks=list(ranks), iterations=iterations, dtype=dtype))


class TuckerBases(nn.Module):
    """The core and the row and width bases, shared by every layer of the group."""

    def __init__(self, core: torch.Tensor, u2: torch.Tensor, u3: torch.Tensor):
        super().__init__()
        self.core = nn.Parameter(core)
        self.U2 = nn.Parameter(u2)
        self.U3 = nn.Parameter(u3)


class TuckerRows(RowSource):
    """One layer: its row of ``U1`` mixes the core into ``M`` (``k2 x k3``); rows are ``U2 M U3ᵀ``."""

    def __init__(self, u1: torch.Tensor, bases: TuckerBases):
        super().__init__(bases.U2.shape[0], bases.U3.shape[0])
        self.u1 = nn.Parameter(u1)
        refer(self, "bases", bases)

    def shared(self) -> list[nn.Module]:
        return [self.bases]

    def _mixed(self) -> torch.Tensor:
        return torch.einsum("a,abc->bc", self.u1.float(), self.bases.core.float())

    def decode(self) -> torch.Tensor:
        return self.bases.U2.float() @ self._mixed() @ self.bases.U3.float().T

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``((x U3) Mᵀ) U2ᵀ``: three small matmuls instead of the full matrix."""
        y = (x @ self.bases.U3.to(x.dtype)) @ self._mixed().T.to(x.dtype) @ self.bases.U2.T.to(x.dtype)
        return y if bias is None else y + bias


def runtime(form: StoredForm, member_rows: list[int]) -> Built:
    """The shared core and bases, and one row of ``U1`` per layer."""
    t = form.tensors
    if len(member_rows) != t["U1"].shape[0] or any(r != t["U2"].shape[0] for r in member_rows):
        raise AECompressError(
            f"group {form.group.name!r} stores a Tucker form of {t['U1'].shape[0]} layers of {t['U2'].shape[0]} rows; "
            f"its matrices have {member_rows} rows"
        )
    bases = TuckerBases(t["core"].clone(), t["U2"].clone(), t["U3"].clone())
    return [bases], [TuckerRows(u.clone(), bases) for u in t["U1"]]


@torch.no_grad()
def decode(stored: StoredForm) -> torch.Tensor:
    """Every layer's rows, stacked, in float32."""
    layers = stored.tensors["U1"].shape[0]
    sources = runtime(stored, [stored.group.rows // layers] * layers)[1]
    return torch.cat([source.decode() for source in sources])


METHOD = Method("tucker", decode=decode, runtime=runtime, compress=compress)
