"""``entropy``: entropy-coded codes with error feedback, counted as the coder's own bitstream."""

import json

import pytest
import torch
from conftest import run_cli

from aecompress.blocks import entropy
from aecompress.blocks.base import GroupStats
from aecompress.compress.tuning import tunable
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import Member, WeightGroup
from aecompress.methods import compress, decode


def _case(seed=0, members=2, rows=64, width=96):
    """Heavy-tailed weights and correlated inputs with uneven scales, as real layers have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((members * rows, width)) * 0.02
    mix = torch.randn(width, width, generator=g) / width**0.5 + torch.eye(width)
    x = torch.randn(4 * width, width, generator=g) @ mix * torch.linspace(0.3, 3.0, width)
    h = (x.T @ x / x.shape[0]).double()
    group = WeightGroup("g", "t", tuple(Member(f"w{i}", i, False) for i in range(members)), members * rows, width)
    return group, w, GroupStats(tokens=x.shape[0], covariances=[h] * members, member_rows=[rows] * members), h


def _output_error(group, w, decoded, h):
    e = (decoded - w).double()
    return float(((e @ h) * e).sum())


def test_the_bitstream_is_the_coders_and_reads_back_exactly():
    symbols = torch.randint(0, 7, (5000,)) + torch.randint(0, 2, (5000,)) * 20
    counts = entropy.table(symbols, 30)
    words = entropy.encoded(symbols, counts)
    assert torch.equal(entropy.decoded(words, counts, symbols.numel()), symbols)
    # The stored length is within a word of what the model's entropy says (a real coder, not an estimate).
    assert abs(words.numel() * 32 - entropy.estimated_bits(symbols)) < 64


@pytest.mark.parametrize("symbols", [
    torch.round(torch.randn(3000) * 7),  # whole floats: counted in one pass
    torch.randint(-40, 9, (3000,)),  # integers
    torch.tensor([0.0, 1e9, 1e9, -5.0]),  # a span wider than the values: sorted
    torch.randn(3000),  # fractions: sorted
    torch.tensor([1.0, float("inf"), 1.0, 3.0]),
])
def test_the_step_searchs_entropy_counts_as_sorting_does(symbols):
    counts = torch.unique(symbols, return_counts=True)[1].double()
    p = counts / counts.sum()
    assert entropy.estimated_bits(symbols) == pytest.approx(float(-(counts * p.log2()).sum()), rel=1e-12)


@pytest.mark.parametrize("bits", [4.0, 3.0, 2.5])
def test_it_fits_the_budget_and_decodes_the_same_everywhere(bits):
    group, w, stats, _ = _case()
    form = compress("entropy", group, w, Budget.of_bits(bits), stats)
    budget = Budget.of_bits(bits).bytes(group.rows, group.width)
    assert form.bytes <= budget and form.bytes > 0.97 * budget
    rows = decode(form)
    assert rows.shape == (group.rows, group.width) and torch.isfinite(rows).all()
    assert torch.equal(rows, decode(form)) and tunable(form)


@pytest.mark.parametrize("bits", [3.0, 2.5])
def test_it_leaves_less_output_error_than_compensated_at_the_same_bytes(bits):
    group, w, stats, h = _case(seed=1)
    ours = compress("entropy", group, w, Budget.of_bits(bits), stats, allocation="absolute", rate=1.0)
    theirs = compress("compensated", group, w, Budget.of_bits(bits), stats, group_size=32, fill=True)
    assert ours.bytes <= theirs.meta["budget_bytes"]
    assert _output_error(group, w, decode(ours), h) < 0.8 * _output_error(group, w, decode(theirs), h)


def test_error_feedback_and_hessian_weighting_each_lower_the_layer_output_error():
    group, w, stats, h = _case(seed=2)
    errors = {name: _output_error(group, w, decode(compress("entropy", group, w, Budget.of_bits(3), stats, **opts)), h)
              for name, opts in (("full", {"hessian": True}), ("no_feedback", {"feedback": False, "hessian": True}),
                                 ("no_hessian", {"hessian": False}))}
    assert errors["full"] < errors["no_feedback"] and errors["full"] < errors["no_hessian"]


@pytest.mark.parametrize("bits", [3.0, 2.5])
def test_coordinate_descent_sweeps_lower_the_layer_output_error_within_the_same_budget(bits):
    group, w, stats, h = _case(seed=3)
    plain = compress("entropy", group, w, Budget.of_bits(bits), stats, sweeps=0)
    swept = compress("entropy", group, w, Budget.of_bits(bits), stats, sweeps=2)
    assert swept.bytes <= swept.meta["budget_bytes"] and swept.meta["sweeps"] == 2
    assert _output_error(group, w, decode(swept), h) < 0.97 * _output_error(group, w, decode(plain), h)


@pytest.mark.parametrize("opts, message", [({"allocation": "even"}, "allocation 'even' is not one of: relative"),
                                           ({"damp": -1}, "damp -1 is not a ridge"),
                                           ({"rate": -0.5}, "rate -0.5 is not a weight"),
                                           ({"sweeps": 1.5}, "sweeps 1.5 is not a number of passes"),
                                           ({"dtype": "int8"}, "unknown dtype 'int8'")])
def test_bad_options_are_one_clear_line(opts, message):
    group, w, stats, _ = _case()
    with pytest.raises(AECompressError, match=message):
        compress("entropy", group, w, Budget.of_bits(3), stats, **opts)


def test_a_compact_export_verifies_and_loads(tiny_lm, tmp_path, capsys, cache):
    text = f"{tiny_lm['text']}:all"
    out = tmp_path / "entropy"
    code, _, err = run_cli(capsys, "compress", "--model", tiny_lm["model"], "--bits", "3", "--method", "entropy",
                           "--calibration", f"{text}[-2048:]", "--calibration_window", "64", "--format", "compact",
                           "--tune_steps", "3", "--out_dir", out)
    assert code == 0, err
    meta = json.loads((out / "aecompress.json").read_text())
    assert {g["method"] for g in meta["groups"]} == {"entropy"} and meta["bits_per_weight"] <= 3
    code, _, err = run_cli(capsys, "verify", out)
    assert code == 0, err
