"""Magnitude pruning: keep the largest-magnitude weights of the group.

Kept values are stored in row-major order; their positions cost the cheapest of a packed
bitmask, flat indices, or per-row column indices plus per-row counts.
"""

from __future__ import annotations

import torch
from torch import nn

from aecompress.blocks.base import Built, GroupStats, Method, float_dtype, item_size, meta, offsets
from aecompress.core.bits import bit_slice, pack_bits, unpack_bits
from aecompress.core.budget import Budget, infeasible_bytes, largest_fitting, packed_bytes
from aecompress.core.dtypes import FloatDtype
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.rowsource import RowSource
from aecompress.core.stored import StoredForm


def index_dtype(largest: int) -> torch.dtype:
    """The smallest integer dtype that stores values in ``0..largest``."""
    if largest <= 255:
        return torch.uint8
    if largest <= 32767:
        return torch.int16
    return torch.int32


def position_costs(rows: int, width: int, kept: int) -> dict[str, int]:
    """Bytes to store which ``kept`` of ``rows x width`` positions survive, per encoding."""
    total = rows * width
    return {
        "bitmask": packed_bytes(total, 1),
        "index": kept * item_size(index_dtype(total - 1)),
        "row_index": kept * item_size(index_dtype(width - 1)) + rows * item_size(index_dtype(width)),
    }


def compress(
    group: WeightGroup,
    rows: torch.Tensor,
    target: Budget,
    stats: GroupStats | None = None,
    *,
    dtype: FloatDtype = "float32",
) -> StoredForm:
    """Magnitude pruning: keep the largest-magnitude weights of the group.

    Kept values are stored in row-major order; their positions cost the
    cheapest of a packed bitmask, flat indices, or per-row column indices plus
    per-row counts (each index at the smallest integer dtype that holds it).

    Args:
        dtype: the stored dtype of the kept values.
    """
    store = float_dtype(dtype, group, "prune")
    m, n = group.rows, group.width
    budget = target.bytes(m, n)
    item = item_size(store)

    def cost(k: int) -> int:
        return k * item + min(position_costs(m, n, k).values())

    kept = largest_fitting(cost, budget, m * n)
    if kept is None:
        raise infeasible_bytes(group.name, m, n, target, cost(1), f"prune ({dtype} values)")
    costs = position_costs(m, n, kept)
    encoding = min(costs, key=lambda k: (costs[k], list(costs).index(k)))
    flat = rows.flatten()
    positions = torch.topk(flat.abs(), kept, sorted=False).indices.sort().values
    tensors = {"values": flat[positions].to(store).contiguous()}
    if encoding == "bitmask":
        mask = torch.zeros(m * n, dtype=torch.uint8)
        mask[positions] = 1
        tensors["mask"] = pack_bits(mask)
    elif encoding == "index":
        tensors["index"] = positions.to(index_dtype(m * n - 1))
    else:
        tensors["columns"] = (positions % n).to(index_dtype(n - 1))
        tensors["counts"] = torch.bincount(positions // n, minlength=m).to(index_dtype(n))
    return StoredForm("prune", group, tensors, meta(target, budget, kept=kept, positions=encoding, dtype=dtype))


class PrunedRows(RowSource):
    """Kept values (trainable) and their positions, scattered into a zero matrix."""

    def __init__(self, rows: int, width: int, values: torch.Tensor, positions: dict[str, torch.Tensor]):
        super().__init__(rows, width)
        self.values = nn.Parameter(values)
        self.encoding = "mask" if "mask" in positions else "index" if "index" in positions else "row_index"
        for name, tensor in positions.items():
            self.register_buffer(name, tensor)

    def positions(self) -> torch.Tensor:
        """Flat positions of the kept values, ascending."""
        m, n = self.rows_count, self.width
        if self.encoding == "mask":
            return unpack_bits(self.mask, m * n).bool().nonzero().flatten()
        if self.encoding == "index":
            return self.index.long()
        rows = torch.repeat_interleave(torch.arange(m, device=self.counts.device), self.counts.long())
        return rows * n + self.columns.long()

    def decode(self) -> torch.Tensor:
        m, n = self.rows_count, self.width
        out = torch.zeros(m * n, dtype=torch.float32, device=self.values.device)
        return out.index_put((self.positions(),), self.values.float()).view(m, n)


def runtime(form: StoredForm, member_rows: list[int]) -> Built:
    """Each member keeps its slice of the kept values and its positions, in the group's encoding."""
    t, n = form.tensors, form.group.width
    sources = []
    kept_before = 0
    for r0, m in zip(offsets(member_rows), member_rows):
        if "mask" in t:
            mask = bit_slice(t["mask"], r0 * n, m * n)
            kept = int(unpack_bits(mask, m * n).sum())
            positions = {"mask": mask}
        elif "index" in t:
            flat = t["index"].long()
            lo, hi = (int(torch.searchsorted(flat, v)) for v in (r0 * n, (r0 + m) * n))
            kept_before, kept = lo, hi - lo
            positions = {"index": (flat[lo:hi] - r0 * n).to(index_dtype(m * n - 1))}
        else:
            counts = t["counts"][r0 : r0 + m].clone()
            kept = int(counts.long().sum())
            positions = {"columns": t["columns"][kept_before : kept_before + kept].clone(), "counts": counts}
        values = t["values"][kept_before : kept_before + kept].clone()
        sources.append(PrunedRows(m, n, values, positions))
        kept_before += kept
    if kept_before != t["values"].numel():
        raise AECompressError(f"group {form.group.name!r}: pruned positions do not match the stored values")
    return [], sources



@torch.no_grad()
def decode(stored: StoredForm) -> torch.Tensor:
    """Scatter the kept values into a zero matrix: the run-time source of one member holding every row."""
    (source,) = runtime(stored, [stored.group.rows])[1]
    positions = source.positions()
    m, n = stored.group.rows, stored.group.width
    if positions.numel() != source.values.numel() or (positions.numel() and int(positions.max()) >= m * n):
        raise AECompressError(f"group {stored.group.name!r}: pruned positions do not match the stored values")
    return source.decode()


METHOD = Method("prune", decode=decode, runtime=runtime, compress=compress)
