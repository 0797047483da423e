"""Error-compensating codes: the same stored form as grouped round-to-nearest, chosen to move the outputs less.

Budget, export round trips and the run-time form are covered for every method of the table
(tests/test_baselines.py, tests/test_properties.py); these are its own properties.
"""

import pytest
import torch

from aecompress.blocks.base import GroupStats
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import Member, WeightGroup
from aecompress.methods import compress, decode


def _case(seed: int = 0, width: int = 128):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, width, generator=gen) @ torch.randn(width, width, generator=gen) * 0.3
    h = (x.T @ x / x.shape[0]).double()
    group = WeightGroup("g", "g", (Member("a", 0, False), Member("b", 1, False)), 64, width)
    stats = GroupStats(tokens=2048, covariances=[h, h], member_rows=[32, 32])
    return group, torch.randn(64, width, generator=gen), stats, torch.linalg.cholesky(h).float()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_at_equal_bytes_the_outputs_move_less_than_with_round_to_nearest(bits):
    group, w, stats, root = _case()
    ratio = 32 / (bits + 0.5)
    nearest = compress("quantize", group, w, Budget.of_ratio(ratio), dtype="float16", code_bits=bits, group_size=64, grid="mse",
                       zeros="int")
    compensated = compress("compensated", group, w, Budget.of_ratio(ratio), stats, code_bits=bits, group_size=64)
    assert compensated.bytes == nearest.bytes
    assert {k: t.shape for k, t in compensated.tensors.items()} == {k: t.shape for k, t in nearest.tensors.items()}
    moved = {name: float(((decode(form) - w) @ root).norm()) for name, form in
             (("nearest", nearest), ("compensated", compensated))}
    assert moved["compensated"] < 0.9 * moved["nearest"]


def test_with_an_identity_second_moment_it_rounds_to_nearest():
    group, w, _, _ = _case(width=64)
    eye = GroupStats(tokens=64, covariances=[torch.eye(64, dtype=torch.float64)] * 2, member_rows=[32, 32])
    a = compress("compensated", group, w, Budget.of_ratio(8.0), eye, code_bits=3, group_size=64, damp=0.0)
    b = compress("quantize", group, w, Budget.of_ratio(8.0), dtype="float16", code_bits=3, group_size=64, grid="mse", zeros="int")
    assert torch.equal(decode(a), decode(b))


def test_it_needs_the_input_second_moments():
    group, w, _, _ = _case()
    with pytest.raises(AECompressError, match="needs input covariances for group 'g'"):
        compress("compensated", group, w, Budget.of_ratio(8.0))


def test_fill_spends_what_a_whole_code_width_leaves_and_moves_the_outputs_less():
    group, w, stats, root = _case()
    ratio = 32 / 3.0  # 2-bit codes cost 2.5 bits per weight here; 3-bit codes (3.5) do not fit
    plain = compress("compensated", group, w, Budget.of_ratio(ratio), stats, group_size=64)
    filled = compress("compensated", group, w, Budget.of_ratio(ratio), stats, group_size=64, fill=True)
    assert plain.meta["bits"] == filled.meta["bits"] == 2
    assert plain.bytes < filled.bytes <= filled.meta["budget_bytes"]
    assert 0 < filled.meta["wide_rows"] < 64 and "wide" in filled.tensors
    moved = {name: float(((decode(form) - w) @ root).norm()) for name, form in (("plain", plain), ("filled", filled))}
    assert moved["filled"] < 0.9 * moved["plain"]


def test_a_filled_form_runs_as_it_decodes_member_by_member():
    from aecompress.methods import METHODS

    group, w, stats, _ = _case()
    form = compress("compensated", group, w, Budget.of_ratio(32 / 3.0), stats, group_size=64, fill=True)
    _, sources = METHODS["compensated"].runtime(form, [32, 32])
    assert torch.equal(torch.cat([s.decode() for s in sources]), decode(form))


def test_the_widened_rows_are_those_whose_error_falls_most():
    group, w, stats, _ = _case()
    loud = w.clone()
    loud[5] *= 40  # a row with far larger weights gains far more from one more bit
    form = compress("compensated", group, loud, Budget.of_ratio(32 / 2.6), stats, group_size=64, fill=True)
    from aecompress.core.bits import unpack_bits

    assert unpack_bits(form.tensors["wide"], 64)[5] == 1


def test_fill_must_be_a_boolean():
    group, w, stats, _ = _case()
    with pytest.raises(AECompressError, match="fill must be true or false, got 'yes'"):
        compress("compensated", group, w, Budget.of_ratio(8.0), stats, group_size=64, fill="yes")


def test_in_activation_order_an_identity_second_moment_still_rounds_to_nearest():
    group, w, _, _ = _case(width=64)
    eye = GroupStats(tokens=64, covariances=[torch.eye(64, dtype=torch.float64)] * 2, member_rows=[32, 32])
    a = compress("compensated", group, w, Budget.of_ratio(8.0), eye, code_bits=3, group_size=64, damp=0.0, order="activation",
                 grid="minmax",
                 zeros="float")
    b = compress("quantize", group, w, Budget.of_ratio(8.0), dtype="float16", code_bits=3, group_size=64)
    assert torch.equal(decode(a), decode(b))


def test_activation_order_rounds_the_loudest_inputs_first_and_moves_the_outputs_less():
    """With min-max grids, which activation order fixes before rounding (a clipped grid is set per group as reached)."""
    group, w, stats, root = _case()
    moved = {order: float(((decode(compress("compensated", group, w, Budget.of_ratio(32 / 2.5), stats, group_size=64, order=order,
                                            grid="minmax", zeros="float"))
                             - w) @ root).norm()) for order in ("natural", "activation")}
    assert moved["activation"] < moved["natural"]


def test_an_unknown_order_is_refused_with_the_valid_ones():
    group, w, stats, _ = _case()
    with pytest.raises(AECompressError, match="order 'random' is not one of: natural, activation"):
        compress("compensated", group, w, Budget.of_ratio(8.0), stats, group_size=64, order="random")


@pytest.mark.parametrize("zeros", ["float", "int"])
@pytest.mark.parametrize("bits", [2, 3])
def test_the_clipped_grid_moves_the_outputs_less_than_min_max_at_the_same_bytes(bits, zeros):
    group, w, stats, root = _case()
    w[3, 7] = 12.0  # one large weight stretches its group's min-max range
    forms = {grid: compress("compensated", group, w, Budget.of_ratio(32 / (bits + 0.5)), stats, code_bits=bits, group_size=64,
                            grid=grid,
                            zeros=zeros) for grid in ("minmax", "mse")}
    assert forms["mse"].bytes == forms["minmax"].bytes
    moved = {grid: float(((decode(form) - w) @ root).norm()) for grid, form in forms.items()}
    assert moved["mse"] < 0.95 * moved["minmax"]


def test_an_unknown_grid_is_refused_with_the_valid_ones():
    group, w, stats, _ = _case()
    with pytest.raises(AECompressError, match="compensated grid 'best' is not one of: minmax, mse"):
        compress("compensated", group, w, Budget.of_ratio(8.0), stats, group_size=64, grid="best")


def test_integer_zeros_free_bytes_that_widen_more_rows_and_the_form_runs_as_it_decodes():
    from aecompress.methods import METHODS

    group, w, stats, root = _case()
    forms = {z: compress("compensated", group, w, Budget.of_ratio(32 / 3.0), stats, group_size=64, fill=True, zeros=z)
             for z in ("float", "int")}
    assert forms["int"].meta["wide_rows"] > forms["float"].meta["wide_rows"]
    assert forms["int"].bytes <= forms["int"].meta["budget_bytes"]
    assert {"zero_codes", "zero_codes_wide"} <= set(forms["int"].tensors) and "zero" not in forms["int"].tensors
    _, sources = METHODS["compensated"].runtime(forms["int"], [32, 32])
    assert torch.equal(torch.cat([s.decode() for s in sources]), decode(forms["int"]))
    moved = {z: float(((decode(form) - w) @ root).norm()) for z, form in forms.items()}
    assert moved["int"] < moved["float"]


def test_float_zeros_and_min_max_grids_store_what_they_stored_before():
    group, w, stats, _ = _case()
    form = compress("compensated", group, w, Budget.of_ratio(32 / 3.0), stats, group_size=64, fill=True, grid="minmax",
                    zeros="float")
    assert {"zero", "scale"} <= set(form.tensors) and "zero_codes" not in form.tensors
    assert form.tensors["zero"].dtype == torch.float16


def test_an_automatic_group_size_takes_the_first_that_divides_the_width():
    group, w, stats, _ = _case(width=128)
    form = compress("compensated", group, w, Budget.of_ratio(8.0), stats, group_size="auto")
    assert form.meta["group_size"] == 128  # 96 does not divide 128
    with pytest.raises(AECompressError, match="group_size 'big' must divide group 'g'"):
        compress("compensated", group, w, Budget.of_ratio(8.0), stats, group_size="big")


@pytest.mark.parametrize("order", ["natural", "activation"])
@pytest.mark.parametrize("group_size", [32, 96, 384])
def test_carrying_errors_a_batch_of_columns_at_a_time_gives_the_column_by_column_codes(monkeypatch, order, group_size):
    """GPTQ's lazy batch update is the same sums in another order: the same codes, scales and zeros (a batch that
    missed the later columns, or a group split across batches, changes them)."""
    from aecompress.methods import compensated

    torch.manual_seed(1)
    w = torch.randn(48, 384)
    x = torch.randn(1024, 384) * torch.rand(384) * 3
    h = (x.T @ x / len(x)).double()
    levels = torch.full((48,), 7.0)
    forms = {}
    for batch in (10**9, 128):  # 10**9: one batch, every error carried column by column
        monkeypatch.setattr(compensated, "BATCH", batch)
        forms[batch] = compensated._member(w, h, levels, group_size, torch.float16, 0.01, order, "mse", "int")
    for one, batched in zip(forms[10**9], forms[128]):
        assert torch.equal(one, batched)
