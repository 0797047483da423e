"""The clipped (``mse``) grid: the same stored tensors as min-max, with less rounding error where it counts."""

import pytest
import torch

from aecompress.blocks.grids import grid, searched
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import Member, WeightGroup
from aecompress.methods import compress, decode


def _rows(seed: int = 0) -> torch.Tensor:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(seed))
    w[::4, 5] *= 15  # every fourth row has one large weight in its first group of columns
    return w


def _group() -> WeightGroup:
    return WeightGroup("g", "g", (Member("a", 0, False),), 32, 128)


@pytest.mark.parametrize("bits", [2, 3])
def test_each_run_rounds_no_worse_than_min_max_and_better_beside_an_outlier(bits):
    w = _rows().view(32, 2, 64)
    errors = {}
    for name, fit in (("minmax", grid), ("mse", searched)):
        scale, zero = fit(w, 2**bits - 1, torch.float16)
        q = zero.float().unsqueeze(-1) + scale.float().unsqueeze(-1) * torch.round(
            (w - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).clamp(0, 2**bits - 1)
        errors[name] = (w - q).pow(2).sum(dim=-1)
    assert (errors["mse"] <= errors["minmax"] * (1 + 1e-5)).all()
    assert errors["mse"][::4, 0].sum() < 0.9 * errors["minmax"][::4, 0].sum()


def test_quantize_stores_the_same_tensors_either_way_and_records_a_clipped_grid():
    forms = {g: compress("quantize", _group(), _rows(), Budget.of_bits(2.5), dtype="float16", group_size=64, code_bits=2,
                         grid=g) for g in ("minmax", "mse")}
    shapes = {g: {k: (t.shape, t.dtype) for k, t in f.tensors.items()} for g, f in forms.items()}
    assert shapes["mse"] == shapes["minmax"] and forms["mse"].bytes == forms["minmax"].bytes
    assert forms["mse"].meta["grid"] == "mse" and "grid" not in forms["minmax"].meta
    moved = {g: float((decode(f) - _rows()).norm()) for g, f in forms.items()}
    assert moved["mse"] < 0.9 * moved["minmax"]


def test_an_unknown_grid_is_refused_with_the_valid_ones():
    with pytest.raises(AECompressError, match="quantize grid 'lloyd' is not one of: minmax, mse"):
        compress("quantize", _group(), _rows(), Budget.of_ratio(8.0), group_size=64, grid="lloyd")


@pytest.mark.parametrize("grid", ["minmax", "mse"])
def test_integer_zeros_cost_the_code_width_and_decode_on_the_grid(grid):
    from aecompress.blocks.grids import unpacked

    float_zero = compress("quantize", _group(), _rows(), Budget.of_ratio(32 / 3.5), dtype="float16", group_size=64, code_bits=3,
                          grid=grid)
    int_zero = compress("quantize", _group(), _rows(), Budget.of_ratio(32 / 3.5), dtype="float16", group_size=64, code_bits=3,
                        grid=grid,
                        zeros="int")
    assert set(int_zero.tensors) == {"codes", "scale", "zero_codes"} and int_zero.meta["zeros"] == "int"
    assert float_zero.bytes - int_zero.bytes == 32 * 2 * 2 - (32 * 2 * 3) // 8  # a float16 each, against 3 bits each
    codes = unpacked(int_zero.tensors["codes"], 32 * 128, 3).view(32, 2, 64).float()
    zero = unpacked(int_zero.tensors["zero_codes"], 64, 3).view(32, 2, 1).float()
    assert zero.max() <= 7
    expected = (int_zero.tensors["scale"].float().unsqueeze(2) * (codes - zero)).view(32, 128)
    assert torch.equal(decode(int_zero), expected)
    assert float((decode(int_zero) - _rows()).norm()) < 1.2 * float((decode(float_zero) - _rows()).norm())


def test_a_flat_run_keeps_its_value_with_an_integer_zero():
    w = torch.full((32, 128), -0.25)
    w[:, 64:] = 0.5
    form = compress("quantize", _group(), w, Budget.of_ratio(32 / 2.5), dtype="float16", group_size=64, code_bits=2, zeros="int")
    assert torch.allclose(decode(form), w, rtol=1e-3)  # to the float16 scale's precision


def test_an_unknown_zero_storage_is_refused_with_the_valid_ones():
    with pytest.raises(AECompressError, match="quantize zeros 'half' is not one of: float, int"):
        compress("quantize", _group(), _rows(), Budget.of_ratio(8.0), group_size=64, zeros="half")


def test_the_old_code_width_option_still_works_with_a_deprecation_line():
    """``bits`` was the code width's name beside ``--bits``, the budget; it is now ``code_bits``."""
    with pytest.warns(FutureWarning, match="option 'bits' of method 'quantize' is now 'code_bits'"):
        old = compress("quantize", _group(), _rows(), Budget.of_bits(3.5), dtype="float16", group_size=64, bits=3)
    new = compress("quantize", _group(), _rows(), Budget.of_bits(3.5), dtype="float16", group_size=64, code_bits=3)
    assert all(torch.equal(old.tensors[k], new.tensors[k]) for k in new.tensors)
    with pytest.raises(AECompressError, match="give 'code_bits' only \\('bits' is its old name\\), not both"):
        compress("quantize", _group(), _rows(), Budget.of_bits(3.5), bits=3, code_bits=3)
