"""Decoded rows kept between calls of the run-time form (off by default)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from aecompress.core.errors import AECompressError


class DecodeCache:
    """Decoded rows kept between calls, least recently used first out.

    Off by default. An entry is reused only while none of the tensors it was
    decoded from has changed (same storage, same version counter), and never
    while gradients must flow into them, so training always decodes afresh.
    """

    def __init__(self, max_bytes: int | None):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[nn.Module, tuple[tuple, torch.Tensor]] = OrderedDict()

    @property
    def bytes(self) -> int:
        """Bytes held by cached rows now."""
        return sum(t.numel() * t.element_size() for _, t in self.entries.values())

    def get(self, owner: nn.Module, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached rows of ``owner`` for ``key``, decoding them on a miss."""
        hit = self.entries.get(owner)
        if hit is not None and hit[0] == key:
            self.entries.move_to_end(owner)
            return hit[1]
        rows = make()
        size = rows.numel() * rows.element_size()
        self.entries.pop(owner, None)
        if self.max_bytes is not None and size > self.max_bytes:
            return rows
        self.entries[owner] = (key, rows)
        while self.max_bytes is not None and self.bytes > self.max_bytes:
            self.entries.popitem(last=False)
        return rows

    def clear(self) -> None:
        """Drop every cached matrix."""
        self.entries.clear()


def make_cache(cache: bool | int) -> DecodeCache | None:
    """The cache a ``cache`` argument asks for: ``True`` all, an integer at most that many bytes, else none."""
    if cache is True:
        return DecodeCache(None)
    if cache is False or cache == 0:
        return None
    if isinstance(cache, int) and cache > 0:
        return DecodeCache(cache)
    raise AECompressError(f"cache must be true, false or a positive number of bytes, got {cache!r}")
