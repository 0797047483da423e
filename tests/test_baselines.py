"""Factorization, pruning and quantization baselines: budgets, optimality checks, exports."""

import re
import warnings

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from aecompress import load_compact
from aecompress.blocks.base import GroupStats
from aecompress.blocks.factorize import Factorization
from aecompress.blocks.factors import _ranks, factor_bytes
from aecompress.core.bits import pack_bits, unpack_bits
from aecompress.core.budget import Budget
from aecompress.core.codes import BITS
from aecompress.core.errors import AECompressError
from aecompress.core.groups import Member, WeightGroup, extract_rows
from aecompress.core.selection import select_groups
from aecompress.data.calibration import collect
from aecompress.formats.export import export
from aecompress.methods import METHODS as METHOD_TABLE
from aecompress.methods import compress, compressors, decode, options
from aecompress.methods.prune import index_dtype, position_costs
from tests.conftest import TINY, build_tiny

METHODS = compressors()
MODULES = {"bert": ["key", "intermediate", "word_embeddings"], "gpt2": ["key", "mlp_fc"], "llama": ["k_proj", "down_proj"]}
AUTO = {"bert": "AutoModel", "gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM"}
FEASIBLE = re.compile(r"feasible ratios are 1 < ratio <= ([\d.]+)")


def _ids(windows: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, TINY["vocab"], (windows, length), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_stats():
    """Per family: the model, its groups in both modes, and their calibration statistics."""
    out = {}
    for family, modules in MODULES.items():
        model = build_tiny(family)
        groups = select_groups(model, modules, "concatenated") + select_groups(model, modules[:1], "separated")
        out[family] = (model, groups, collect(model, groups, _ids()))
    return out


def _whitened_error(w: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor) -> float:
    e = (w - approx).double()
    return float(torch.trace(e @ cov @ e.T))


def _stats_for(method: str, group: WeightGroup, stats: GroupStats) -> GroupStats | None:
    return stats if METHOD_TABLE[method].needs else None


def _needs_linear_input(method: str) -> bool:
    """Whether a method reads input covariances, which an embedding has none of."""
    return "covariance" in METHOD_TABLE[method].needs


@pytest.mark.parametrize("family", list(MODULES))
@pytest.mark.parametrize("ratio", [2.0, 4.0, 10.0])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_respects_the_budget(tiny_stats, family, ratio, method):
    model, groups, stats = tiny_stats[family]
    for group in groups:
        if _needs_linear_input(method) and stats[group.name].mean_covariance() is None:
            with pytest.raises(AECompressError, match="needs the input of a linear layer"):
                compress(method, group, extract_rows(model, group), Budget.of_ratio(ratio), stats[group.name])
            continue
        budget = Budget.of_ratio(ratio).bytes(group.rows, group.width)
        try:
            form = compress(method, group, extract_rows(model, group), Budget.of_ratio(ratio), stats[group.name])
        except AECompressError as err:
            assert float(FEASIBLE.search(str(err)).group(1)) < ratio
            continue
        assert form.bytes <= budget and form.ratio >= ratio
        assert form.meta["target_ratio"] == ratio and form.meta["budget_bytes"] == budget
        assert decode(form).shape == (group.rows, group.width)


@pytest.mark.parametrize("method", ["svd", "prune", "quantize"])
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), width=st.integers(1, 70), ratio=st.floats(1.01, 60.0), seed=st.integers(0, 9))
def test_budget_is_never_exceeded_and_nearly_used(method, rows, width, ratio, seed):
    group = WeightGroup("g", "g", (Member("w", None, False),), rows, width)
    w = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
    budget = Budget.of_ratio(ratio).bytes(rows, width)
    try:
        form = compress(method, group, w, Budget.of_ratio(ratio))
    except AECompressError as err:
        assert float(FEASIBLE.search(str(err)).group(1)) < ratio
        return
    assert form.bytes <= budget
    # As close as the method's granularity allows: one more unit would not fit.
    if method == "svd":
        assert form.meta["ranks"][0] == min(rows, width) or form.bytes + (rows + width) * 4 > budget
    elif method == "quantize":
        assert form.meta["bits"] == 8 or compress_bytes_at_bits(group, w, form.meta["bits"] + 1) > budget
    else:
        kept = form.meta["kept"]
        assert kept == rows * width or (kept + 1) * 4 + min(position_costs(rows, width, kept + 1).values()) > budget
    assert torch.isfinite(decode(form)).all()


def compress_bytes_at_bits(group: WeightGroup, w: torch.Tensor, bits: int) -> int:
    return compress("quantize", group, w, Budget.of_ratio(1.0001), code_bits=bits).bytes


@pytest.mark.parametrize("sharing", ["group", "layer"])
def test_whitened_svd_beats_svd_on_the_whitened_objective(tiny_stats, sharing):
    model, groups, stats = tiny_stats["llama"]
    group = next(g for g in groups if g.name == "down_proj")
    s, w = stats[group.name], extract_rows(model, group)
    svd = decode(compress("svd", group, w, Budget.of_ratio(4.0), sharing=sharing))
    white = decode(compress("whitened_svd", group, w, Budget.of_ratio(4.0), s, sharing=sharing))
    if sharing == "group":
        cov = s.mean_covariance()
        assert _whitened_error(w, white, cov) < 0.9 * _whitened_error(w, svd, cov)
    else:
        parts = [(w, svd, white)[k].split(s.member_rows) for k in range(3)]
        err_svd = sum(_whitened_error(a, b, c) for a, b, c in zip(parts[0], parts[1], s.covariances))
        err_white = sum(_whitened_error(a, b, c) for a, b, c in zip(parts[0], parts[2], s.covariances))
        assert err_white < 0.9 * err_svd


@pytest.mark.parametrize("sharing", ["group", "layer"])
def test_whitened_svd_equals_svd_when_covariance_is_identity(tiny_stats, sharing):
    model, groups, _ = tiny_stats["gpt2"]
    group = next(g for g in groups if g.name == "mlp_fc")
    w = extract_rows(model, group)
    eye = GroupStats(tokens=10_000, covariances=[torch.eye(group.width, dtype=torch.float64)] * len(group.members))
    white = compress("whitened_svd", group, w, Budget.of_ratio(4.0), eye, sharing=sharing)
    svd = compress("svd", group, w, Budget.of_ratio(4.0), sharing=sharing)
    assert white.meta["ranks"] == svd.meta["ranks"]
    torch.testing.assert_close(decode(white), decode(svd), rtol=1e-5, atol=1e-5)


def test_greedy_allocation_spends_the_budget_better(tiny_stats):
    model, groups, stats = tiny_stats["llama"]
    group = next(g for g in groups if g.name == "down_proj")
    s, w = stats[group.name], extract_rows(model, group)
    forms = {a: compress("whitened_svd", group, w, Budget.of_ratio(4.0), s, sharing="layer",
                         allocation=a) for a in ("uniform", "greedy")}
    assert forms["uniform"].bytes <= forms["greedy"].bytes <= Budget.of_ratio(4.0).bytes(group.rows, group.width)

    def error(form):
        parts = zip(w.split(s.member_rows), decode(form).split(s.member_rows), s.covariances)
        return sum(_whitened_error(a, b, c) for a, b, c in parts)

    assert error(forms["greedy"]) <= error(forms["uniform"]) * (1 + 1e-9)


def test_fwsvd_with_uniform_weights_equals_svd(tiny_stats):
    model, groups, _ = tiny_stats["bert"]
    for group in groups:
        w = extract_rows(model, group)
        size = group.rows // len(group.members)
        uniform = GroupStats(tokens=1, fisher=[torch.full((size,), 3.7, dtype=torch.float64)] * len(group.members))
        # Uniform within each matrix is enough under the default per-member normalization.
        per_member = GroupStats(tokens=1, fisher=[torch.full((size,), 0.5 + i, dtype=torch.float64)
                                                  for i in range(len(group.members))])
        for sharing in ("group", "layer"):
            svd = decode(compress("svd", group, w, Budget.of_ratio(4.0), sharing=sharing))
            for stats, normalize in ((uniform, "group"), (uniform, "member"), (per_member, "member")):
                fw = compress("fwsvd", group, w, Budget.of_ratio(4.0), stats, sharing=sharing, normalize=normalize)
                assert torch.equal(decode(fw), svd)
        if len(group.members) > 1:
            fw = compress("fwsvd", group, w, Budget.of_ratio(4.0), per_member, normalize="group")
            assert not torch.equal(decode(fw), decode(compress("svd", group, w, Budget.of_ratio(4.0))))


def test_fwsvd_beats_svd_on_the_fisher_weighted_error(tiny_stats):
    model, groups, stats = tiny_stats["gpt2"]
    group = next(g for g in groups if g.name == "mlp_fc")
    w, c = extract_rows(model, group), stats[group.name].row_weights().float().unsqueeze(1)
    fw = decode(compress("fwsvd", group, w, Budget.of_ratio(4.0), stats[group.name]))
    svd = decode(compress("svd", group, w, Budget.of_ratio(4.0)))
    assert ((w - fw) * c).norm() < ((w - svd) * c).norm()


def test_short_calibration_is_regularized_with_a_warning():
    model = build_tiny("llama")
    (group,) = select_groups(model, ["k_proj"])
    stats = collect(model, [group], _ids(windows=1, length=8), what=("covariance",))[group.name]
    with pytest.warns(UserWarning, match="8 calibration tokens cannot give a full-rank 32 x 32"):
        form = compress("whitened_svd", group, extract_rows(model, group), Budget.of_ratio(4.0), stats, damp=0.0)
    assert form.meta["damp"] >= 1e-2 and torch.isfinite(decode(form)).all()


def test_singular_covariance_damps_until_cholesky_works():
    group = WeightGroup("g", "g", (Member("w", None, False),), 8, 6)
    cov = torch.zeros(6, 6, dtype=torch.float64)
    cov[0, 0] = 1.0  # rank one
    stats = GroupStats(tokens=1000, covariances=[cov])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        form = compress("whitened_svd", group, torch.randn(8, 6), Budget.of_ratio(2.0), stats, damp=0.0)
    assert form.meta["damp"] > 0 and torch.isfinite(decode(form)).all()


@pytest.mark.parametrize("rows,width,ratio,encoding", [
    (16, 16, 2.0, "bitmask"), (16, 16, 20.0, "index"), (200, 200, 30.0, "row_index"), (300, 300, 60.0, "row_index"),
])
def test_prune_keeps_the_largest_weights_under_each_position_encoding(rows, width, ratio, encoding):
    group = WeightGroup("g", "g", (Member("w", None, False),), rows, width)
    w = torch.randn(rows, width, generator=torch.Generator().manual_seed(0))
    form = compress("prune", group, w, Budget.of_ratio(ratio))
    assert form.meta["positions"] == encoding
    out = decode(form)
    kept = out != 0
    assert int(kept.sum()) == form.meta["kept"]
    assert torch.equal(out[kept], w[kept])
    assert w[kept].abs().min() >= w[~kept].abs().max()
    if encoding != "bitmask":
        key = "index" if encoding == "index" else "columns"
        assert form.tensors[key].dtype == index_dtype(rows * width - 1 if encoding == "index" else width - 1)


def test_quantize_error_is_within_half_a_step():
    group = WeightGroup("g", "g", (Member("w", None, False),), 40, 50)
    w = torch.randn(40, 50, generator=torch.Generator().manual_seed(0))
    for bits in (1, 3, 8):
        form = compress("quantize", group, w, Budget.of_ratio(1.01), code_bits=bits)
        assert form.tensors["codes"].dtype == torch.uint8 and form.tensors["codes"].numel() == (40 * 50 * bits + 7) // 8
        step = form.tensors["scale"].float().unsqueeze(1)
        assert ((decode(form) - w).abs() <= step / 2 + 1e-5).all()
    with pytest.raises(AECompressError, match="quantize \\(8 bits"):
        compress("quantize", group, w, Budget.of_ratio(10.0), code_bits=8)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 1), max_size=100))
def test_bit_packing_round_trips(bits):
    tensor = torch.tensor(bits, dtype=torch.uint8)
    packed = pack_bits(tensor)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(bits) + 7) // 8
    assert torch.equal(unpack_bits(packed, len(bits)), tensor)


@pytest.mark.parametrize("dtype,item", [("float32", 4), ("float16", 2), ("bfloat16", 2)])
def test_low_precision_factors_are_counted_at_their_size(tiny_stats, dtype, item):
    model, groups, _ = tiny_stats["gpt2"]
    group = next(g for g in groups if g.name == "mlp_fc")
    form = compress("svd", group, extract_rows(model, group), Budget.of_ratio(4.0), dtype=dtype)
    rank = form.meta["ranks"][0]
    assert form.tensors["A"].element_size() == item and form.bytes == rank * (group.rows + group.width) * item
    assert form.bytes <= Budget.of_ratio(4.0).bytes(group.rows, group.width) < form.bytes + (group.rows + group.width) * item


@pytest.mark.parametrize("dtype,item", [("float32", 4), ("float16", 2)])
def test_int8_codes_buy_rank_at_one_byte_per_code_plus_a_row_scale(tiny_stats, dtype, item):
    model, groups, _ = tiny_stats["gpt2"]
    group = next(g for g in groups if g.name == "mlp_fc")
    rows = extract_rows(model, group)
    plain = compress("svd", group, rows, Budget.of_ratio(4.0), dtype=dtype)
    form = compress("svd", group, rows, Budget.of_ratio(4.0), dtype=dtype, codes="int8", layout="plain")
    rank = form.meta["ranks"][0]
    assert form.tensors["A"].dtype == torch.int8 and form.tensors["A_scales"].dtype == torch.float16
    assert form.bytes == rank * (group.rows + group.width * item) + 2 * group.rows
    assert form.bytes <= Budget.of_ratio(4.0).bytes(group.rows, group.width) and rank > plain.meta["ranks"][0]
    # Plain codes are the rank-r factor rounded per row: the error stays within half a step.
    exact = compress("svd", group, rows, Budget.of_ratio(1.0001), dtype="float32")
    a = exact.tensors["A"][:, :rank].float()
    step = form.tensors["A_scales"].float().unsqueeze(1)
    assert ((form.tensors["A"].float() * step - a).abs() <= step / 2 + 1e-5).all()


def _error(form, rows) -> float:
    return float((decode(form) - rows).double().pow(2).sum())


@pytest.mark.parametrize("sharing", ["group", "layer"])
def test_fewer_bit_codes_are_packed_counted_exactly_and_buy_rank(tiny_stats, sharing):
    model, groups, stats = tiny_stats["llama"]
    group = next(g for g in groups if g.name == "down_proj")
    rows, budget = extract_rows(model, group), Budget.of_ratio(4.0).bytes(group.rows, group.width)
    ranks = {}
    for bits in BITS:
        form = compress("svd", group, rows, Budget.of_ratio(4.0), stats[group.name], codes=f"int{bits}", sharing=sharing,
                        dtype="float16")
        ranks[bits] = form.meta["ranks"]
        suffixes = [""] if sharing == "group" else [f".{i}" for i in range(len(group.members))]
        expected = sum(factor_bytes(form.tensors[f"A{s}_scales"].shape[0], group.width, r, 2, bits)
                       for s, r in zip(suffixes, form.meta["ranks"]))
        assert form.bytes == expected <= budget and form.meta["codes"] == f"int{bits}"
        assert (form.tensors[f"A{suffixes[0]}"].dtype == torch.int8) == (bits == 8)
        assert torch.isfinite(decode(form)).all()
    assert sum(ranks[3]) > sum(ranks[8])  # fewer bits, more rank, same bytes


def test_balanced_layout_rounds_no_worse_than_plain(tiny_stats):
    model, groups, _ = tiny_stats["llama"]
    group = next(g for g in groups if g.name == "down_proj")
    rows = extract_rows(model, group)
    for bits in (4, 8):
        balanced = compress("svd", group, rows, Budget.of_ratio(2.0), codes=f"int{bits}")
        plain = compress("svd", group, rows, Budget.of_ratio(2.0), codes=f"int{bits}", layout="plain")
        assert balanced.meta["ranks"] == plain.meta["ranks"] and balanced.bytes == plain.bytes
        assert _error(balanced, rows) <= _error(plain, rows) * (1 + 1e-6)
        assert plain.meta["gain_exponents"] == [1.0]


def test_auto_codes_state_a_feasible_bound_when_no_width_fits():
    group = WeightGroup("g", "g", (Member("w", 0, False),), 200, 8)
    rows = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AECompressError, match="infeasible") as err:
        compress("svd", group, rows, Budget.of_ratio(30.0), dtype="float16", codes="auto")
    bound = float(FEASIBLE.search(str(err.value)).group(1))
    assert compress("svd", group, rows, Budget.of_ratio(bound), dtype="float16", codes="auto").ratio >= bound


@pytest.mark.parametrize("bits", [None, 3, 4, 8])
def test_greedy_ranks_never_keep_less_energy_than_uniform_ones(bits):
    gen = torch.Generator().manual_seed(0)
    # Three blocks with very different spectra: greedy should move rank to the steep one.
    blocks = [Factorization(torch.randn(40, 24, generator=gen, dtype=torch.float64) * torch.logspace(0, -k, 24,
                                                                                                    dtype=torch.float64),
                            None, None) for k in (0.5, 2, 4)]
    for budget in (3000, 5000, 8000):
        ranks = {a: _ranks(blocks, 24, budget, 2, a, bits) for a in ("uniform", "greedy")}
        kept = {a: sum(float(b.s[:r].pow(2).sum()) for b, r in zip(blocks, rs)) for a, rs in ranks.items()}
        spent = sum(factor_bytes(b.rows, 24, r, 2, bits) for b, r in zip(blocks, ranks["greedy"]))
        assert spent <= budget and kept["greedy"] >= kept["uniform"]


def test_auto_codes_keep_the_width_with_the_least_error(tiny_stats):
    model, groups, _ = tiny_stats["llama"]
    group = next(g for g in groups if g.name == "down_proj")
    rows = extract_rows(model, group)
    for ratio in (2.0, 6.0):
        errors = {f"int{b}": _error(compress("svd", group, rows, Budget.of_ratio(ratio), codes=f"int{b}"), rows) for b in BITS}
        auto = compress("svd", group, rows, Budget.of_ratio(ratio), codes="auto")
        assert auto.meta["codes"] == min(errors, key=errors.get)
        assert _error(auto, rows) == pytest.approx(min(errors.values()))
    with pytest.raises(AECompressError, match="unknown codes 'int2' .* valid: dtype, int3, .*, int8, auto"):
        compress("svd", group, rows, Budget.of_ratio(2.0), codes="int2")
    with pytest.raises(AECompressError, match="unknown layout 'even' .* valid: balanced, plain"):
        compress("svd", group, rows, Budget.of_ratio(2.0), codes="int4", layout="even")


@pytest.mark.parametrize("family", list(MODULES))
@pytest.mark.parametrize("method", METHODS)
def test_decoded_and_compact_exports_round_trip_bit_exactly(tiny_stats, tiny_dirs, tmp_path, family, method):
    model, groups, stats = tiny_stats[family]
    # Concatenated groups only: a separated group would overwrite part of one of them.
    chosen = [g for g in groups if g.name in MODULES[family] and ("embed" not in g.name or not _needs_linear_input(method))]
    opts = {"sharing": "layer"} if method == "whitened_svd" else {}
    forms = {g.name: compress(method, g, extract_rows(model, g), Budget.of_ratio(4.0), _stats_for(method, g, stats[g.name]),
                              **opts)
             for g in chosen}
    source = str(tiny_dirs[family])
    export(model, forms, source, AUTO[family], "tiny", str(tmp_path / "decoded"), "decoded")
    export(model, forms, source, AUTO[family], "tiny", str(tmp_path / "compact"), "compact")
    decoded = getattr(transformers, AUTO[family]).from_pretrained(tmp_path / "decoded").eval()
    compact = load_compact(tmp_path / "compact")
    for g in chosen:
        assert torch.equal(extract_rows(decoded, g), decode(forms[g.name]))
    a, b = decoded.state_dict(), compact.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_method_and_option_list_the_valid_ones(tiny_stats):
    model, groups, stats = tiny_stats["llama"]
    group, rows = groups[0], extract_rows(model, groups[0])
    with pytest.raises(AECompressError, match="unknown compression method 'nonesuch'; valid: svd, fwsvd, whitened_svd, prune"):
        compress("nonesuch", group, rows, Budget.of_ratio(4.0))
    with pytest.raises(AECompressError, match="unknown option 'rank' for method 'svd'; valid: sharing, allocation, dtype"):
        compress("svd", group, rows, Budget.of_ratio(4.0), rank=3)
    with pytest.raises(AECompressError, match="unknown sharing 'all' .* valid: group, layer"):
        compress("whitened_svd", group, rows, Budget.of_ratio(4.0), stats[group.name], sharing="all")
    with pytest.raises(AECompressError, match="unknown dtype 'int8' .* valid: float32, float16, bfloat16"):
        compress("prune", group, rows, Budget.of_ratio(4.0), dtype="int8")
    for method, need in (("fwsvd", "fisher"), ("whitened_svd", "covariance")):
        with pytest.raises(AECompressError, match=f"method '{method}' needs .*what=\\('{need}',\\)"):
            compress(method, group, rows, Budget.of_ratio(4.0))
    with pytest.raises(AECompressError, match="greater than 1"):
        compress("svd", group, rows, Budget.of_ratio(1.0))
    assert options("quantize") == {"code_bits": None, "dtype": "float32", "group_size": None, "grid": "minmax", "zeros": "float"}
