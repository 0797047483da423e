"""Int8 rows with float16 scales: exact round trips, bounded error, clear refusals."""

import pytest
import torch

from aecompress.errors import AECompressError
from aecompress.rowquant import LEVELS, dequantize_rows, fake_int8, quantize_rows, stored_values


@pytest.mark.parametrize("magnitude", [1e-7, 1e-5, 1e-3, 1.0, 1e3, 1e6])
def test_error_is_at_most_half_a_step_at_every_magnitude(magnitude):
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * magnitude
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16
    assert (scale.float() * LEVELS >= x.abs().amax(dim=1)).all()  # rounded up: nothing is clamped
    error = (dequantize_rows(codes, scale) - x).abs()
    assert (error <= scale.float().unsqueeze(1) / 2 * (1 + 1e-6)).all()


def test_zero_rows_stay_zero_and_the_round_trip_is_exact():
    x = torch.randn(8, 16)
    x[2] = 0
    codes, scale = quantize_rows(x)
    assert scale[2] == 0 and torch.count_nonzero(codes[2]) == 0
    assert torch.equal(fake_int8(x), dequantize_rows(codes, scale))
    assert torch.equal(quantize_rows(fake_int8(x))[0], codes)


def test_a_row_too_large_for_a_float16_scale_is_refused():
    with pytest.raises(AECompressError, match="too large for int8 codes"):
        quantize_rows(torch.full((2, 4), 1e7))


def test_codes_without_scales_or_with_wrong_scales_are_refused():
    codes, scale = quantize_rows(torch.randn(4, 3))
    with pytest.raises(AECompressError, match="'A_scales' is missing"):
        stored_values({"A": codes}, "A")
    with pytest.raises(AECompressError, match="do not match"):
        stored_values({"A": codes, "A_scales": scale[:3]}, "A")
    assert torch.equal(stored_values({"A": codes, "A_scales": scale}, "A"), dequantize_rows(codes, scale))
