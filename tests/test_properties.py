"""Properties over random small shapes, ratios and group selections (hypothesis).

- the stored-size budget is never exceeded, by the autoencoder or any baseline;
- extracting a group's rows and putting them back is the identity, and rows put in come back out;
- the compact export reloads equal, bit for bit, to the decoded export.

Example counts are set per property with ``settings(max_examples=...)`` and kept
modest so the file runs in well under a minute; ``pytest --hypothesis-show-statistics``
prints how many ran.
"""

from __future__ import annotations

import inspect
import re
import tempfile
from functools import cache
from pathlib import Path

import torch
import transformers
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aecompress import load_compact
from aecompress.blocks.base import GroupStats
from aecompress.blocks.factorize import Factorization
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import Member, WeightGroup, assign_rows, extract_rows
from aecompress.core.selection import select_groups
from aecompress.data.calibration import collect
from aecompress.formats.export import export
from aecompress.methods import METHODS as METHOD_TABLE
from aecompress.methods import compress, compressors, decode
from aecompress.training.module import CompressorModule
from tests.conftest import TINY, build_tiny

FEASIBLE = re.compile(r"feasible ratios are 1 < ratio <= ([\d.]+)")
AUTO = {"bert": "AutoModel", "gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM"}
EMBEDDINGS = {"word_embeddings", "wte", "embed_tokens"}
STORAGE = "storage_dtype" if "storage_dtype" in inspect.signature(CompressorModule).parameters else None


def examples(n: int) -> settings:
    """``n`` examples, no deadline, the same examples on every run (reproducible in CI)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


ratios = st.floats(1.05, 40.0, allow_nan=False)


def _infeasible_below(err: AECompressError, ratio: float) -> None:
    """An infeasible ratio must be refused with a stated range that excludes it."""
    found = FEASIBLE.search(str(err))
    assert found and float(found.group(1)) < ratio, str(err)


def _group(members: int, rows_each: int, width: int) -> WeightGroup:
    return WeightGroup("g", "g", tuple(Member(f"w{i}", i, False) for i in range(members)), members * rows_each, width)


# --- the budget is never exceeded --------------------------------------------------------------------


@examples(40)
@given(
    rows=st.integers(1, 80), width=st.integers(1, 48), ratio=ratios,
    encoder=st.sampled_from(["mlp", "linear", "free"]), decoder=st.sampled_from(["mlp", "linear", "residual"]),
    enforce_norm=st.booleans(), storage=st.sampled_from(["float32", "float16", "bfloat16"]),
    latents=st.sampled_from(["dtype", "int3", "int5", "int8", "auto"]), seed=st.integers(0, 99),
)
def test_autoencoder_never_exceeds_its_budget(rows, width, ratio, encoder, decoder, enforce_norm, storage, latents,
                                              seed):
    group = _group(1, rows, width)
    if latents == "auto" and decoder == "mlp":
        latents = "int8"  # auto sizes codes by a factorization: linear and residual decoders only
    extra = {STORAGE: storage, "latent_storage": latents} if STORAGE else {}
    try:
        module = CompressorModule(
            groups=[{**group.to_dict(), "ratio": ratio}], encoder=encoder, decoder=decoder,
            out_activation="none" if decoder != "mlp" else "tanh", enforce_norm=enforce_norm, **extra,
        )
    except AECompressError as err:
        _infeasible_below(err, ratio)
        return
    w = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
    if latents == "auto":
        module.resolve_codes(group, Factorization(w.double(), None, None))  # what setup() does when fitting starts
    (form,) = module.stored_forms({"g": w}).values()
    assert form.bytes <= Budget.of_ratio(ratio).bytes(rows, width)
    assert form.ratio >= ratio
    out = decode(form)
    assert out.shape == (rows, width) and torch.isfinite(out).all()


def _stats(members: int, rows_each: int, width: int, seed: int) -> GroupStats:
    g = torch.Generator().manual_seed(seed)
    covs = []
    for _ in range(members):
        x = torch.randn(3 * width, width, generator=g, dtype=torch.float64)
        covs.append(x.T @ x / x.shape[0])
    fisher = [torch.rand(rows_each, generator=g, dtype=torch.float64) for _ in range(members)]
    return GroupStats(tokens=3 * width, covariances=covs, fisher=fisher, member_rows=[rows_each] * members)


@examples(60)
@given(
    method=st.sampled_from(compressors()), members=st.integers(1, 3), rows_each=st.integers(1, 24),
    width=st.integers(1, 24), ratio=ratios, sharing=st.sampled_from(["group", "layer"]),
    dtype=st.sampled_from(["float32", "float16"]), codes=st.sampled_from(["dtype", "int3", "int5", "int8", "auto"]),
    seed=st.integers(0, 99),
)
def test_baselines_never_exceed_the_budget(method, members, rows_each, width, ratio, sharing, dtype, codes, seed):
    group = _group(members, rows_each, width)
    w = torch.randn(group.rows, width, generator=torch.Generator().manual_seed(seed))
    opts = {"dtype": dtype}
    if method in ("svd", "fwsvd", "whitened_svd"):
        opts.update(sharing=sharing, codes=codes)
    stats = _stats(members, rows_each, width, seed) if METHOD_TABLE[method].needs else None
    try:
        form = compress(method, group, w, Budget.of_ratio(ratio), stats, **opts)
    except AECompressError as err:
        _infeasible_below(err, ratio)
        return
    assert form.bytes <= Budget.of_ratio(ratio).bytes(group.rows, width)
    assert form.ratio >= ratio
    out = decode(form)
    assert out.shape == (group.rows, width) and torch.isfinite(out).all()


# --- extract, then put back: the identity -----------------------------------------------------------


@cache
def _model(family: str) -> torch.nn.Module:
    return build_tiny(family)


# The names configs and checkpoints written before module types were derived from the model use.
NAMES = {
    "bert": ["word_embeddings", "query", "key", "value", "attention_output", "intermediate", "output"],
    "gpt2": ["wte", "query", "key", "value", "attention_output", "mlp_fc", "mlp_proj"],
    "llama": ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def _selection(draw_family: str):
    types = NAMES[draw_family] + ["attention", "mlp", "all"]
    return st.lists(st.sampled_from(types), min_size=1, max_size=3, unique=True)


@st.composite
def selections(draw, families=("bert", "gpt2", "llama")):
    family = draw(st.sampled_from(families))
    modules = draw(_selection(family))
    mode = draw(st.sampled_from(["concatenated", "separated"]))
    return family, modules, mode


def _groups(model, modules, mode) -> list[WeightGroup]:
    try:
        groups = select_groups(model, modules, mode)
    except AECompressError:
        assume(False)  # e.g. an alias and one of its types: the same group twice
    # Overlapping selections (``attention`` and ``key``) would write the same rows twice.
    params = [(m.param, m.part) for g in groups for m in g.members]
    assume(len(params) == len(set(params)))
    return groups


@examples(40)
@given(selection=selections(), seed=st.integers(0, 99))
def test_extract_then_put_back_is_the_identity(selection, seed):
    family, modules, mode = selection
    model = _model(family)
    groups = _groups(model, modules, mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        for g in groups:
            assign_rows(model, g, extract_rows(model, g))
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        gen = torch.Generator().manual_seed(seed)
        new = {g.name: torch.randn(g.rows, g.width, generator=gen) for g in groups}
        for g in groups:
            assign_rows(model, g, new[g.name])
        for g in groups:
            assert torch.equal(extract_rows(model, g), new[g.name])
    finally:
        model.load_state_dict(before)


# --- compact equals decoded -------------------------------------------------------------------------


@cache
def _calibration(family: str, modules: tuple[str, ...], mode: str) -> dict[str, GroupStats]:
    model = _model(family)
    ids = torch.randint(0, TINY["vocab"], (4, 16), generator=torch.Generator().manual_seed(0))
    return collect(model, select_groups(model, list(modules), mode), ids)


@examples(15)
@given(selection=selections(), method=st.sampled_from(["ae", *compressors()]), ratio=st.floats(1.5, 12.0))
def test_compact_equals_decoded(tiny_dirs, selection, method, ratio):
    family, modules, mode = selection
    model = _model(family)
    groups = _groups(model, modules, mode)
    if method != "ae" and "covariance" in METHOD_TABLE[method].needs:  # an embedding has no linear input
        assume(not any(g.module_type in EMBEDDINGS for g in groups))
    try:
        if method == "ae":
            module = CompressorModule(groups=[{**g.to_dict(), "ratio": ratio} for g in groups], encoder="free")
            forms = module.stored_forms({g.name: extract_rows(model, g) for g in groups})
        else:
            stats = _calibration(family, tuple(modules), mode) if METHOD_TABLE[method].needs else {}
            forms = {g.name: compress(method, g, extract_rows(model, g), Budget.of_ratio(ratio),
                                      stats.get(g.name)) for g in groups}
    except AECompressError as err:
        _infeasible_below(err, ratio)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for fmt in ("decoded", "compact"):
            export(model, forms, str(tiny_dirs[family]), AUTO[family], "tiny", str(tmp / fmt), fmt)
        decoded = getattr(transformers, AUTO[family]).from_pretrained(tmp / "decoded")
        compact = load_compact(tmp / "compact")
    a, b = decoded.state_dict(), compact.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for g in groups:
        assert torch.equal(extract_rows(compact, g), decode(forms[g.name]))

