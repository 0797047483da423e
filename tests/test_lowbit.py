"""Few-bit factor codes: balanced columns keep the product and never round worse; the width kept is the best one."""

import pytest
import torch

from aecompress.blocks.factorize import Factorization
from aecompress.blocks.lowbit import GAIN_EXPONENTS, balance, gains, layout_error, pick_bits, refine, rounding_error
from aecompress.core.codes import BITS, dequantize_rows, quantize_rows


def spectrum_matrix(rows=96, width=24, seed=0) -> torch.Tensor:
    """A matrix whose singular values fall over three decades, like a weight matrix's whitened spectrum."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, width, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.logspace(0, -3, width, dtype=torch.float64)) @ v.T


def test_balancing_keeps_the_product_and_plain_is_gain_one():
    fact = Factorization(spectrum_matrix(), None, None)
    a, b = fact.factors(24, torch.float32)
    a2, b2, alpha, _ = balance(a, b, 8)
    torch.testing.assert_close(a2 @ b2, a @ b, rtol=1e-5, atol=1e-7)
    assert alpha in GAIN_EXPONENTS
    assert torch.equal(gains(a, 1.0), torch.ones(24))
    plain = balance(a, b, 8, balanced=False)
    assert plain[2] == 1.0 and torch.equal(plain[0], a) and torch.equal(plain[1], b)


@pytest.mark.parametrize("bits", [4, 8])
def test_balanced_codes_round_better_than_plain_ones_on_a_falling_spectrum(bits):
    fact = Factorization(spectrum_matrix(), None, None)
    a, b = fact.factors(24, torch.float32)
    plain = rounding_error(a, gains(a, 1.0), bits, None)
    _, _, alpha, balanced = balance(a, b, bits)
    assert balanced <= plain
    assert alpha < 1 and balanced < 0.5 * plain
    # The reported error is the error the stored product really has.
    a2, b2, _, _ = balance(a, b, bits)
    real = float((dequantize_rows(*quantize_rows(a2, bits)) @ b2 - a @ b).double().pow(2).sum())
    assert real == pytest.approx(balanced, rel=1e-3)


def test_zero_columns_keep_gain_one_and_round_trip_without_nan():
    a = torch.zeros(10, 4)
    a[:, 0] = torch.randn(10)
    b = torch.randn(4, 6)
    a2, b2, _, error = balance(a, b, 4)
    assert torch.isfinite(a2).all() and torch.isfinite(b2).all() and error >= 0
    assert torch.equal(gains(torch.zeros(5, 3), 0.25), torch.ones(3))


def test_row_weights_weigh_the_rounding_error():
    a = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    weights = torch.tensor([0.0, 0, 0, 0, 0, 2.0], dtype=torch.float64)
    only_last = rounding_error(a[5:], torch.ones(5), 4, None) * 4
    assert rounding_error(a, torch.ones(5), 4, weights) == pytest.approx(only_last)


def test_the_width_picked_is_the_one_with_least_truncation_plus_rounding():
    fact = Factorization(spectrum_matrix(rows=200, width=32), None, None)
    ranks = {3: 32, 4: 28, 6: 20, 8: 12}  # fewer bits, more rank, as at one budget
    errors = {bits: layout_error(fact, rank, bits) for bits, rank in ranks.items()}
    assert pick_bits({bits: [(fact, rank)] for bits, rank in ranks.items()}) == min(errors, key=errors.get)
    # Each error is what the stored product leaves, measured directly.
    a, b = fact.factors(20, torch.float32)
    a2, b2, _, _ = balance(a, b, 6)
    direct = float((dequantize_rows(*quantize_rows(a2, 6)) @ b2).double().sub(fact.wl).pow(2).sum())
    assert errors[6] == pytest.approx(direct, rel=1e-3)
    assert set(ranks) <= set(BITS)


@pytest.mark.parametrize("bits", [4, 8])
def test_refinement_columns_keep_the_other_codes_and_cut_the_error_they_cover(bits):
    fact = Factorization(spectrum_matrix(), None, None)
    a, b = fact.factors(24, torch.float32)
    wide, wide_b = refine(a, b, bits, 10)
    assert wide.shape == (96, 34) and wide_b.shape == (34, 24)
    torch.testing.assert_close(wide[:, :24] @ b, a @ b)
    codes, scale = quantize_rows(a, bits)
    wide_codes, wide_scale = quantize_rows(wide, bits)
    assert torch.equal(wide_scale, scale) and torch.equal(wide_codes[:, :24], codes)  # nothing else moves
    before = float((dequantize_rows(codes, scale) @ b - a @ b).double().pow(2).sum())
    after = float((dequantize_rows(wide_codes, wide_scale) @ wide_b - a @ b).double().pow(2).sum())
    assert after < before
    # The error model used to pick widths matches what the stored codes leave.
    assert rounding_error(a, torch.ones(24), bits, None, 10) == pytest.approx(after, rel=1e-3)
    assert layout_error(fact, 34, bits, balanced=False) == pytest.approx(after, rel=1e-3)
