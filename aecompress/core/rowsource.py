"""The run-time interface every compression method implements: one member's rows, decoded on demand.

A method's run-time form (see :mod:`aecompress.runtime`) holds only what its stored form keeps
and hands out rows when a layer runs. Each method subclasses :class:`RowSource`; the
stand-in modules that replace ``nn.Linear`` and ``nn.Embedding`` only ever call
:meth:`RowSource.apply` and :meth:`RowSource.lookup`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def refer(module: nn.Module, name: str, value) -> None:
    """Keep a reference without registering it, so shared modules are owned once."""
    object.__setattr__(module, name, value)


class RowSource(nn.Module):
    """One member's (rows x width) matrix, in ``nn.Linear`` layout, decoded on demand.

    ``cache`` is set by the run-time form: an object with ``get(owner, key, make)`` and
    ``entries`` (see :class:`aecompress.runtime.cache.DecodeCache`), or None.
    """

    chunk_rows = 0
    """Rows a source decodes at a time where no gradient is wanted and no cache is on (0: all at once).

    A source whose :meth:`decode_rows` is cheaper than slicing :meth:`decode` sets it, so a layer
    never holds its whole decoded matrix: each block of rows is decoded while it is still in the
    CPU's cache and multiplied at once, and an embedding decodes only the rows it looks up.
    """

    def __init__(self, rows: int, width: int):
        super().__init__()
        self.rows_count, self.width = rows, width
        refer(self, "cache", None)

    def shared(self) -> list[nn.Module]:
        """Modules this source reads but does not own (a group's decoder or basis)."""
        return []

    def decode(self) -> torch.Tensor:
        """The rows in float32, differentiable in the stored tensors."""
        raise NotImplementedError

    def decode_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start .. stop`` in float32, the same values as ``decode()[start:stop]``."""
        return self.decode()[start:stop]

    def _blockwise(self) -> bool:
        return bool(self.chunk_rows) and self.cache is None and self._frozen()

    def _frozen(self) -> bool:
        tensors = [*self.parameters(), *(p for m in self.shared() for p in m.parameters())]
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

    def rows(self) -> torch.Tensor:
        """The decoded rows, from the cache when one is on and nothing has changed."""
        if self.cache is None or not self._frozen():
            return self.decode()
        tensors = [*self.parameters(), *self.buffers(), *(t for m in self.shared() for t in m.parameters())]
        key = (torch.is_inference_mode_enabled(), *((t.data_ptr(), t._version) for t in tensors))
        return self.cache.get(self, key, self.decode)

    def cached(self) -> torch.Tensor | None:
        """The rows if the cache holds an entry for this source (refreshed if stale), else None."""
        if self.cache is None or self not in self.cache.entries or not self._frozen():
            return None
        return self.rows()

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ rowsᵀ + bias``: what an ``nn.Linear`` with these rows computes (block by block, see ``chunk_rows``)."""
        if not self._blockwise() or self.chunk_rows >= self.rows_count:
            return F.linear(x, self.rows().to(x.dtype), bias)
        outs = []
        for start in range(0, self.rows_count, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.rows_count)
            part = None if bias is None else bias[start:stop]
            outs.append(F.linear(x, self.decode_rows(start, stop).to(x.dtype), part))
        return torch.cat(outs, dim=-1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows at ``ids``: what an ``nn.Embedding`` with these rows returns (only those rows, see ``chunk_rows``)."""
        if not self._blockwise():
            return F.embedding(ids, self.rows())
        wanted, where = torch.unique(ids, return_inverse=True)
        rows = torch.cat([self.decode_rows(r, r + 1) for r in wanted.tolist()])
        return F.embedding(where, rows)

    def extra_repr(self) -> str:
        return f"rows={self.rows_count}, width={self.width}"
