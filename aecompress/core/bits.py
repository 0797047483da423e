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



PIECE_CODES = {1: 8, 2: 4, 3: 4, 4: 2, 5: 2, 6: 2, 7: 2, 8: 1}
"""Codes read by one table look-up at each width: a byte's worth where codes fill bytes exactly, else the
most codes whose bits (at most 14) divide a word of eight codes, so that the table stays small (<= 128 KiB)."""

_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _table(bits: int, device: torch.device) -> torch.Tensor:
    """The float32 codes of every possible piece: row ``i`` holds the codes packed in the bits of ``i``."""
    key = (bits, device)
    if key not in _TABLES:
        per = PIECE_CODES[bits]
        index = torch.arange(2 ** (per * bits), dtype=torch.int64, device=device).unsqueeze(1)
        shifts = bits * torch.arange(per, dtype=torch.int64, device=device)
        _TABLES[key] = ((index >> shifts) & (2**bits - 1)).float()
    return _TABLES[key]


def code_values(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """The first ``count`` ``bits``-wide codes of a stream (each code's bits lowest first), as exact float32.

    Eight codes fill exactly ``bits`` bytes. Each word of eight is cut into pieces of
    :data:`PIECE_CODES` codes (a whole byte where codes fill bytes), and each piece's codes are
    read from a small table in one gather, already as floats: a few whole-tensor ops on an eighth
    of the codes, instead of one int32 per bit. This is the hot loop of decoding packed codes just
    in time, so it allocates only the pieces' indices and the result.
    """
    words = -(-count // 8)
    stream = packed[: words * bits]
    if stream.numel() < words * bits:
        stream = torch.cat([stream, stream.new_zeros(words * bits - stream.numel())])
    per = PIECE_CODES[bits]
    if per * bits == 8:
        index = stream.long()
    else:
        lanes = stream.view(words, bits)
        word = lanes[:, 0].long()
        for i in range(1, bits):
            word |= lanes[:, i].long() << (8 * i)
        pieces = 8 // per
        index = torch.empty(words, pieces, dtype=torch.int64, device=packed.device)
        for p in range(pieces):
            torch.bitwise_and(word >> (p * per * bits), 2 ** (per * bits) - 1, out=index[:, p])
    return torch.nn.functional.embedding(index.view(-1), _table(bits, packed.device)).view(-1)[:count]
