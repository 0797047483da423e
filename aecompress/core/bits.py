"""The one bit packer: a flat stream of 0/1 values, eight to a byte, first value in the lowest bit.

Every packed tensor aecompress stores is this stream: few-bit code planes
(:mod:`aecompress.core.codes`), quantization codes and pruning masks.
"""

from __future__ import annotations

import torch


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 0/1 tensor (flattened in row-major order) into uint8, eight per byte, first in the lowest bit."""
    pad = (-bits.numel()) % 8
    flat = torch.cat([bits.flatten().to(torch.int32), torch.zeros(pad, dtype=torch.int32, device=bits.device)])
    return (flat.view(-1, 8) << torch.arange(8, dtype=torch.int32, device=bits.device)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as uint8 0/1."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.flatten()[:count].to(torch.uint8)


def bit_slice(packed: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Bits ``start .. start+count`` of a :func:`pack_bits` stream, packed on their own (one layer's share)."""
    first, last = start // 8, (start + count + 7) // 8
    if start % 8 == 0:
        return packed[first:last].clone()
    bits = unpack_bits(packed[first:last], (last - first) * 8)
    return pack_bits(bits[start % 8 : start % 8 + count])
