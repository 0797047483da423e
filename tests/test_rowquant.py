"""Integer rows of 3 to 8 bits with float16 scales: exact round trips, bounded error, clear refusals."""

import pytest
import torch

from aecompress.core.codes import (
    BITS,
    code_bytes,
    dequantize_rows,
    fake_quant,
    levels,
    pack_codes,
    quantize_rows,
    stored_bits,
    stored_values,
    unpack_codes,
)
from aecompress.core.errors import AECompressError


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("magnitude", [1e-7, 1e-5, 1e-3, 1.0, 1e3])
def test_error_is_at_most_half_a_step_at_every_magnitude(magnitude, bits):
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * magnitude
    codes, scale = quantize_rows(x, bits)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16
    assert codes.abs().max() <= levels(bits)
    assert (scale.float() * levels(bits) >= x.abs().amax(dim=1)).all()  # rounded up: nothing is clamped
    error = (dequantize_rows(codes, scale) - x).abs()
    assert (error <= scale.float().unsqueeze(1) / 2 * (1 + 1e-6)).all()


def test_fewer_bits_round_more_coarsely():
    x = torch.randn(32, 40, generator=torch.Generator().manual_seed(1))
    errors = [float((dequantize_rows(*quantize_rows(x, b)) - x).pow(2).sum()) for b in BITS]
    assert errors == sorted(errors, reverse=True) and errors[0] > 100 * errors[-1]


def test_zero_rows_stay_zero_and_the_round_trip_is_exact():
    x = torch.randn(8, 16)
    x[2] = 0
    codes, scale = quantize_rows(x)
    assert scale[2] == 0 and torch.count_nonzero(codes[2]) == 0
    assert torch.equal(fake_quant(x), dequantize_rows(codes, scale))
    assert torch.equal(quantize_rows(fake_quant(x))[0], codes)


def test_a_row_too_large_for_a_float16_scale_is_refused():
    with pytest.raises(AECompressError, match="too large for 8-bit codes"):
        quantize_rows(torch.full((2, 4), 1e7))
    with pytest.raises(AECompressError, match="codes of 2 bits are not supported; valid: 3, 4, 5, 6, 7, 8"):
        quantize_rows(torch.ones(2, 4), 2)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("columns", [1, 7, 8, 9, 23])
def test_packed_codes_round_trip_and_take_the_bytes_the_accountant_counts(bits, columns):
    codes, scale = quantize_rows(torch.randn(5, columns, generator=torch.Generator().manual_seed(bits)), bits)
    codes[0, 0], codes[-1, -1] = levels(bits), -levels(bits)  # both extremes survive packing
    stored = pack_codes(codes, bits)
    assert stored_bits(stored) == bits
    assert stored.numel() * stored.element_size() + scale.numel() * 2 == code_bytes(5, columns, bits)
    assert torch.equal(unpack_codes(stored, columns), codes)
    values = stored_values({"A": stored, "A_scales": scale}, "A", columns)
    assert torch.equal(values, dequantize_rows(codes, scale))
    assert torch.count_nonzero(unpack_codes(stored)[:, columns:]) == 0  # padding decodes to zero


def test_codes_without_scales_or_with_wrong_scales_are_refused():
    codes, scale = quantize_rows(torch.randn(4, 3))
    with pytest.raises(AECompressError, match="'A_scales' is missing"):
        stored_values({"A": codes}, "A")
    with pytest.raises(AECompressError, match="do not match"):
        stored_values({"A": codes, "A_scales": scale[:3]}, "A")
    assert torch.equal(stored_values({"A": codes, "A_scales": scale}, "A"), dequantize_rows(codes, scale))
    planes = pack_codes(*quantize_rows(torch.randn(4, 12), 4)[:1], 4)
    with pytest.raises(AECompressError, match="'A_scales' is missing"):
        stored_values({"A": planes}, "A", 12)
    with pytest.raises(AECompressError, match="do not match 17 columns"):  # 2 bytes of planes hold 9..16 columns
        stored_values({"A": planes, "A_scales": scale}, "A", 17)
    with pytest.raises(AECompressError, match="do not match"):  # 8 bit planes are never written: int8 is
        stored_values({"A": torch.zeros(4, 8, 2, dtype=torch.uint8), "A_scales": scale}, "A", 16)
