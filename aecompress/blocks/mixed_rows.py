"""Grouped codes of two widths: most rows at ``k`` bits, the rows that gain most at ``k + 1``.

A budget in bits per weight rarely lands on a whole code width: at 4 bits per weight with a
float16 scale and zero per 64 columns, 4-bit codes cost 4.5 and do not fit, and 3-bit codes
leave half a bit per weight unspent. Widening some rows by one bit spends that remainder. The
stored form keeps the narrow rows' codes, the wide rows' codes, a one-bit mask saying which rows
are wide, and the usual scale and zero per group of columns; the mask is counted like
everything else. Integer zeros (``zeros: int``) are stored like the codes: the narrow rows' as
``k``-bit codes, the wide rows' as ``k + 1``.
"""

from __future__ import annotations

import torch

from aecompress.blocks.base import Built, item_size, offsets
from aecompress.blocks.grids import (
    GridCodes,
    block_rows,
    codes_of,
    dequantized,
    on_grid_zeros,
    packed,
    unpacked,
    zero_codes,
)
from aecompress.blocks.int4_kernel import FusedRows
from aecompress.core.bits import bit_slice, pack_bits, unpack_bits
from aecompress.core.budget import packed_bytes
from aecompress.core.stored import StoredForm


def cost(rows: int, width: int, bits: int, wide: int, group_size: int, store: torch.dtype, zeros: str = "float") -> int:
    """Bytes of ``rows - wide`` rows of ``bits``-bit codes, ``wide`` rows of ``bits + 1``, the mask, scales and zeros."""
    runs = width // group_size
    codes = packed_bytes((rows - wide) * width, bits) + packed_bytes(wide * width, bits + 1)
    if zeros == "int":
        return (codes + packed_bytes(rows, 1) + rows * runs * item_size(store)
                + packed_bytes((rows - wide) * runs, bits) + packed_bytes(wide * runs, bits + 1))
    return codes + packed_bytes(rows, 1) + 2 * rows * runs * item_size(store)


def most_wide(rows: int, width: int, bits: int, group_size: int, store: torch.dtype, budget: int,
              zeros: str = "float") -> int:
    """The most rows that can be one bit wider within ``budget`` bytes (0 if even the mask does not fit)."""
    lo, hi = 0, rows
    if cost(rows, width, bits, 0, group_size, store, zeros) > budget:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(rows, width, bits, mid, group_size, store, zeros) <= budget else (lo, mid - 1)
    return lo


def tensors(codes: torch.Tensor, wide: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor,
            zeros: str = "float") -> dict:
    """The stored tensors of ``codes`` (rows x width), ``wide`` (bool per row) rows one bit wider."""
    out = {"codes": packed(codes[~wide], bits), "codes_wide": packed(codes[wide], bits + 1),
           "wide": pack_bits(wide.to(torch.uint8)), "scale": scale.contiguous()}
    if zeros != "int":
        return out | {"zero": zero.contiguous()}
    levels = torch.where(wide, 2 ** (bits + 1) - 1, 2**bits - 1).unsqueeze(1)
    found = zero_codes(scale, zero, levels)
    return out | {"zero_codes": packed(found[~wide], bits), "zero_codes_wide": packed(found[wide], bits + 1)}


def _zeros(t: dict, scale: torch.Tensor, mine: torch.Tensor, before: int, r0: int, bits: int) -> torch.Tensor:
    """One member's float zeros: stored, or ``-scale * zero_code`` from the narrow and wide zero-code streams."""
    m, runs = mine.shape[0], scale.shape[1]
    if "zero" in t:
        return t["zero"][r0 : r0 + m].clone()
    count = int(mine.sum())
    codes = torch.empty(m, runs, dtype=torch.int32)
    codes[~mine] = unpacked(bit_slice(t["zero_codes"], (r0 - before) * runs * bits, (m - count) * runs * bits),
                            (m - count) * runs, bits).view(m - count, runs)
    codes[mine] = unpacked(bit_slice(t["zero_codes_wide"], before * runs * (bits + 1), count * runs * (bits + 1)),
                           count * runs, bits + 1).view(count, runs)
    return -scale.float() * codes.float()


class MixedRows(FusedRows):
    """One member's rows: narrow and wide packed codes, the wide-row mask, and trainable scales and zeros."""

    def __init__(self, rows: int, width: int, bits: int, narrow: torch.Tensor, wide_codes: torch.Tensor,
                 wide: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        super().__init__(rows, width)
        self.bits = bits
        self.register_buffer("narrow", narrow)
        self.register_buffer("wide_codes", wide_codes)
        self.register_buffer("wide", wide)
        self.scale = torch.nn.Parameter(scale)
        self.zero = torch.nn.Parameter(zero)

        self.chunk_rows = block_rows(rows, width)

    def decode(self) -> torch.Tensor:
        return self.decode_rows(0, self.rows_count)

    def decode_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start .. stop``: the narrow rows among them are consecutive in the narrow stream, the wide in the wide."""
        n, bits, rows = self.width, self.bits, stop - start
        wide = self.wide[start:stop].bool()
        before, count = int(self.wide[:start].sum()), int(wide.sum())
        narrow = codes_of(self.narrow, (start - before) * n, (rows - count) * n, bits).view(rows - count, n)
        widened = codes_of(self.wide_codes, before * n, count * n, bits + 1).view(count, n)
        if count in (0, rows):
            codes = widened if count else narrow
        else:
            codes = torch.empty(rows, n, device=self.narrow.device)
            codes[~wide], codes[wide] = narrow, widened
        return dequantized(codes, self.scale[start:stop], self.zero[start:stop])

    def code_width(self) -> int:
        return self.bits + int(bool(self.wide.any()))

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The codes of both streams in row order (the scales and zeros hold the difference in width)."""
        n, rows = self.width, self.rows_count
        wide = self.wide.bool()
        count = int(wide.sum())
        codes = torch.empty(rows, n)
        codes[~wide] = codes_of(self.narrow, 0, (rows - count) * n, self.bits).view(rows - count, n)
        codes[wide] = codes_of(self.wide_codes, 0, count * n, self.bits + 1).view(count, n)
        return codes, self.scale.detach(), self.zero.detach()


def runtime(form: StoredForm, member_rows: list[int]) -> Built:
    """Each member keeps its own rows' share of both code streams, its mask, scales and zeros."""
    t, n, bits = form.tensors, form.group.width, int(form.meta["bits"])
    mask = unpack_bits(t["wide"], form.group.rows)
    sources = []
    for r0, m in zip(offsets(member_rows), member_rows):
        before, mine = int(mask[:r0].sum()), mask[r0 : r0 + m]
        count = int(mine.sum())
        narrow = bit_slice(t["codes"], (r0 - before) * n * bits, (m - count) * n * bits)
        wide_codes = bit_slice(t["codes_wide"], before * n * (bits + 1), count * n * (bits + 1))
        scale = t["scale"][r0 : r0 + m].clone()
        sources.append(MixedRows(m, n, bits, narrow, wide_codes, mine.clone(), scale,
                                 _zeros(t, scale, mine.bool(), before, r0, bits)))
    return [], sources


def grid_codes(form: StoredForm) -> GridCodes:
    """Every row on the wider width: a narrow row's codes and zero codes are the same integers one bit wider.

    So a container that holds one code width per matrix (compressed-tensors) keeps the form exactly,
    at the cost of one more bit for each narrow code in its file (the accountant still counts the form).

    Raises:
        AECompressError: for float zeros off the grid, naming the option that stores integer zeros.
    """
    (source,) = runtime(form, [form.group.rows])[1]
    codes, scale, zero = source.grid()
    if scale.dim() == 1:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    bits = int(form.meta["bits"]) + 1
    found = on_grid_zeros(form, scale, zero, bits)
    runs = scale.shape[1]
    return GridCodes(bits, None if runs == 1 else form.group.width // runs, codes.to(torch.int32), scale,
                     found.to(torch.int32))


@torch.no_grad()
def decode(form: StoredForm) -> torch.Tensor:
    """Every row of the group, decoded through one source."""
    (source,) = runtime(form, [form.group.rows])[1]
    return source.decode()
