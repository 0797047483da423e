"""Just-in-time decoding of packed codes: the fast unpack gives the very bits the one-bit-at-a-time decode gave."""

import pytest
import torch
import torch.nn.functional as F

from aecompress.blocks import mixed_rows
from aecompress.blocks.grids import stored
from aecompress.core.bits import unpack_bits
from aecompress.core.groups import Member, WeightGroup
from aecompress.core.stored import StoredForm
from aecompress.methods import quantize


def _old_unpacked(stream: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """The decode before the fast unpack: one int32 per bit, shifted and summed."""
    weights = torch.arange(bits, dtype=torch.int32)
    return (unpack_bits(stream, count * bits).view(count, bits).to(torch.int32) << weights).sum(dim=1, dtype=torch.int32)


def _old_zeros(t: dict, key: str, scale: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    return -scale.float() * _old_unpacked(t[key], count, bits).view(scale.shape).float()


def _old_decode(t: dict, m: int, n: int, bits: int) -> torch.Tensor:
    """Rows as the decode before computed them: ``zero + scale * code``, narrow and wide rows each from their stream."""
    scale = t["scale"] if t["scale"].dim() == 2 else t["scale"].unsqueeze(1)
    runs = scale.shape[1]
    wide = unpack_bits(t["wide"], m).bool() if "wide" in t else torch.zeros(m, dtype=torch.bool)
    count = int(wide.sum())
    codes, zero = torch.empty(m, n, dtype=torch.int32), torch.empty(m, runs)
    codes[~wide] = _old_unpacked(t["codes"], (m - count) * n, bits).view(-1, n)
    codes[wide] = _old_unpacked(t["codes_wide"], count * n, bits + 1).view(-1, n) if count else codes[wide]
    if "zero" in t:
        zero = t["zero"].float().view(m, runs)
    else:
        zero[~wide] = _old_zeros(t, "zero_codes", scale[~wide], (m - count) * runs, bits)
        if count:
            zero[wide] = _old_zeros(t, "zero_codes_wide", scale[wide], count * runs, bits + 1)
    return (zero.unsqueeze(2) + scale.float().unsqueeze(2) * codes.float().view(m, runs, -1)).view(m, n)


def _form(bits: int, zeros: str, fill: bool, m: int, n: int, runs: int) -> StoredForm:
    gen = torch.Generator().manual_seed(bits * 10 + runs)
    wide = (torch.rand(m, generator=gen) < 0.3) if fill else torch.zeros(m, dtype=torch.bool)
    levels = torch.where(wide, 2 ** (bits + 1) - 1, 2**bits - 1).unsqueeze(1)
    codes = (torch.rand(m, n, generator=gen) * (levels + 1)).floor().to(torch.int32)
    scale = (torch.rand(m, runs, generator=gen) + 0.1).half()
    zero = -scale.float() * (torch.rand(m, runs, generator=gen) * (levels + 1)).floor() if zeros == "int" \
        else torch.randn(m, runs, generator=gen).half()
    if runs == 1 and not fill:  # one scale per row, the layout before groups (mixed rows always have groups)
        scale, zero = scale.squeeze(1), zero.squeeze(1)
    group = WeightGroup("g", "g", (Member("a", 0, False),), m, n)
    if fill:
        return StoredForm("compensated", group, mixed_rows.tensors(codes, wide, bits, scale, zero, zeros), {"bits": bits})
    return StoredForm("quantize", group, stored(codes, bits, scale, zero, zeros), {"bits": bits})


def _source(form: StoredForm):
    module = mixed_rows if "wide" in form.tensors else quantize
    return module.runtime(form, [form.group.rows])[1][0]


@pytest.mark.parametrize("fill", [False, True])
@pytest.mark.parametrize("zeros", ["float", "int"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_decodes_to_the_same_bits_as_before(bits, zeros, fill):
    if fill and bits == 8:
        pytest.skip("no code is wider than 8 bits: 8-bit codes are never filled")
    for m, n, runs in ((40, 64, 2), (21, 36, 1)):  # rows on whole bytes (decoded by blocks) and rows that are not
        form = _form(bits, zeros, fill, m, n, runs)
        expected = _old_decode(form.tensors, m, n, bits)
        source = _source(form)
        assert torch.equal((mixed_rows.decode if fill else quantize.decode)(form), expected)
        with torch.no_grad():
            assert torch.equal(source.decode(), expected)
            if n % 8 == 0:
                assert torch.equal(source.decode_rows(8, 24), expected[8:24])


@pytest.mark.parametrize("fill", [False, True])
def test_a_layer_decoded_by_blocks_gives_the_whole_matrix_result(fill):
    form = _form(3, "int", fill, 40, 64, 2)
    source, expected = _source(form), _old_decode(form.tensors, 40, 64, 3)
    source.chunk_rows = 16  # three blocks, the last one short
    x, bias, ids = torch.randn(5, 64), torch.randn(40), torch.tensor([[3, 39, 3], [0, 17, 8]])
    with torch.no_grad():
        torch.testing.assert_close(source.apply(x, bias), F.linear(x, expected, bias), rtol=1e-6, atol=1e-6)
        assert torch.equal(source.lookup(ids), expected[ids])
    source.scale.grad = None
    source.apply(x, bias).sum().backward()  # with gradients wanted the whole matrix is decoded, differentiably
    assert source.scale.grad is not None and source.scale.grad.abs().sum() > 0
