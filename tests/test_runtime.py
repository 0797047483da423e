"""The run-time form: compressed weights decoded just in time, equal to the decoded model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from aecompress import load_compact, methods
from aecompress.blocks.factors import FactorRows
from aecompress.cli import main
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import extract_rows
from aecompress.core.selection import select_groups
from aecompress.data.calibration import collect
from aecompress.formats.export import export
from aecompress.methods import compress
from aecompress.methods.autoencoder import AERows
from aecompress.runtime.bench import resident_bytes
from aecompress.runtime.load import load_runtime
from aecompress.runtime.modules import CompressedEmbedding, CompressedLinear
from tests.conftest import TINY, build_tiny
from tests.test_cli import fit_and_export

# An embedding, a plain or fused (GPT-2 c_attn) attention matrix, and a non-square MLP matrix.
MODULES = {
    "bert": ["word_embeddings", "key", "output"],
    "gpt2": ["wte", "query", "mlp_proj"],
    "llama": ["embed_tokens", "k_proj", "down_proj"],
}
AUTO = {"bert": "AutoModel", "gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM"}
METHODS = ["svd", "fwsvd", "whitened_svd", "prune", "quantize"]


def outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids)[0]


def ids(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(TINY["vocab"], (batch, length), generator=torch.Generator().manual_seed(seed))


def expected_bytes(decoded: nn.Module, directory) -> int:
    """The decoded model's bytes, less each compressed matrix at float32, plus what its form stores."""
    meta = json.loads((directory / "aecompress.json").read_text())
    return resident_bytes(decoded) - 4 * meta["original_numbers"] + meta["stored_bytes"]


def assert_runs_like_decoded(directory) -> nn.Module:
    decoded = load_compact(directory)
    compact = load_compact(directory, materialize=False)
    with torch.no_grad():
        torch.testing.assert_close(outputs(compact, ids()), outputs(decoded, ids()), rtol=1e-4, atol=1e-5)
    assert resident_bytes(compact) == expected_bytes(decoded, directory)
    return compact


@pytest.fixture(scope="module")
def ae_exports(tmp_path_factory, tiny_dirs):
    """AE compact exports (fit through the CLI), one per family, made on first use."""
    made = {}

    def get(family: str):
        if family not in made:
            root = tmp_path_factory.mktemp(f"ae-{family}")
            fit_and_export(root, tiny_dirs[family], MODULES[family])
            made[family] = root / "compact"
        return made[family]

    return get


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_autoencoder_runtime_matches_decoded(ae_exports, family):
    directory = ae_exports(family)
    compact = assert_runs_like_decoded(directory)
    swapped = [m for m in compact.modules() if isinstance(m, (CompressedLinear, CompressedEmbedding))]
    # embeddings, both layers of two matrix types, and GPT-2's tied lm_head
    assert len(swapped) == 1 + 2 * 2 + (family == "gpt2")
    meta = json.loads((directory / "aecompress.json").read_text())
    full = {m["param"] for g in meta["groups"] for m in g["group"]["members"]}
    assert not full & set(compact.state_dict()), "compressed weights must not be held at full size"


@pytest.mark.parametrize(
    "options",
    [
        {"data.mode": "separated", "model.encoder": "free", "model.decoder": "linear",
         "model.out_activation": "none", "model.enforce_norm": False},
        {"model.encoder": "free", "model.decoder": "residual", "model.residual_hidden": 2,
         "model.out_activation": "none"},
    ],
    ids=["separated-linear", "residual"],
)
def test_other_autoencoders_run(tmp_path, tiny_dirs, options):
    fit_and_export(tmp_path, tiny_dirs["llama"], ["q_proj", "up_proj"], **options)
    compact = assert_runs_like_decoded(tmp_path / "compact")
    # a linear output layer runs as two matmuls, with norms from the Gram matrix
    sources = [m for g in compact.aecompress.groups.values() for m in g.members]
    assert sources and all(s.factored for s in sources)
    compact(input_ids=ids(), labels=ids()).loss.backward()
    assert all(s.latents.grad is not None and s.latents.grad.abs().sum() > 0 for s in sources)
    assert all(p.grad is not None for g in compact.aecompress.groups.values() for p in g.shared.parameters())


def _baseline_export(tmp_path, family: str, method: str, **options):
    model = build_tiny(family)
    source = tmp_path / "source"
    model.save_pretrained(source)
    modules = MODULES[family][1:] if method == "whitened_svd" else MODULES[family]  # no covariance for embeddings
    groups = select_groups(model, modules)
    need = {"fwsvd": ("fisher",), "whitened_svd": ("covariance",)}.get(method)
    stats = collect(model, groups, ids(1, 4, 16), what=need) if need else {}
    forms = {g.name: compress(method, g, extract_rows(model, g), Budget.of_ratio(4.0), stats.get(g.name),
                              **options) for g in groups}
    out = tmp_path / "compact"
    export(model, forms, str(source), AUTO[family], family, str(out), fmt="compact")
    return out


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_baseline_runtime_matches_decoded(tmp_path, family, method):
    assert_runs_like_decoded(_baseline_export(tmp_path, family, method))


@pytest.mark.parametrize("method", ["svd", "whitened_svd"])
def test_per_layer_factors_run(tmp_path, method):
    assert_runs_like_decoded(_baseline_export(tmp_path, "gpt2", method, sharing="layer", allocation="greedy"))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("sharing", ["group", "layer"])
def test_int8_codes_run_like_decoded(tmp_path, sharing, dtype):
    # int8 codes are widened to float32 once at load, so only the outputs are compared, not resident bytes.
    directory = _baseline_export(tmp_path, "llama", "whitened_svd", sharing=sharing, codes="int8", dtype=dtype)
    main(["verify", str(directory)])
    decoded, compact = load_compact(directory), load_compact(directory, materialize=False)
    with torch.no_grad():
        torch.testing.assert_close(outputs(compact, ids()), outputs(decoded, ids()), rtol=1e-4, atol=1e-5)


def test_factors_run_as_two_matmuls(tmp_path):
    compact = load_compact(_baseline_export(tmp_path, "llama", "svd"), materialize=False)
    layer = compact.model.layers[0].self_attn.k_proj
    (source,) = layer.parts
    assert isinstance(source, FactorRows)
    assert source.basis is compact.model.layers[1].self_attn.k_proj.parts[0].basis  # one basis for the group
    rank = source.A.shape[1]
    assert rank * (layer.in_features + layer.out_features) < layer.in_features * layer.out_features


def test_shared_decoder_is_one_object(ae_exports):
    directory = ae_exports("llama")
    compact = load_compact(directory, materialize=False)
    group = compact.aecompress.groups["k_proj"]
    (decoder,) = group.shared
    sources = [layer.self_attn.k_proj.parts[0] for layer in compact.model.layers]
    assert len(sources) == 2 and all(isinstance(s, AERows) and s.decoder is decoder for s in sources)
    assert [s for s in sources] == list(group.members)
    # by memory: the parameter count holds the decoder once
    meta = json.loads((directory / "aecompress.json").read_text())
    decoded = load_compact(directory)
    total = sum(p.numel() for p in compact.parameters())
    assert total == sum(p.numel() for p in decoded.parameters()) - meta["original_numbers"] + meta["stored_numbers"]
    # and the state dict saves it once
    shared = {p.data_ptr() for p in decoder.parameters()}
    assert sum(t.data_ptr() in shared for t in compact.state_dict().values()) == len(shared)


def test_gradients_reach_latents_and_decoder(ae_exports):
    compact = load_compact(ae_exports("gpt2"), materialize=False).train()
    outputs(compact, ids()).square().mean().backward()
    for name in ("wte", "query", "mlp_proj"):
        group = compact.aecompress.groups[name]
        assert all(m.latents.grad is not None and m.latents.grad.abs().sum() > 0 for m in group.members), name
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in group.shared[0].parameters() if p.dim() == 2), name


def test_plain_loop_fine_tunes_the_compact_form(tmp_path):
    compact = load_compact(_baseline_export(tmp_path, "llama", "svd"), materialize=False).train()
    stored = [p for n, p in compact.named_parameters() if n.startswith("aecompress.")]
    optimizer = torch.optim.Adam(stored, lr=1e-2)
    before = [p.detach().clone() for p in stored]
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = compact(input_ids=ids(), labels=ids()).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(not torch.equal(b, p) for b, p in zip(before, stored))


def test_cache_is_off_by_default_and_follows_changes(ae_exports):
    directory = ae_exports("bert")
    plain = load_compact(directory, materialize=False)
    assert plain.aecompress.cache is None
    cached = load_compact(directory, materialize=False, cache=True)
    with torch.no_grad():
        first = outputs(cached, ids())
        assert len(cached.aecompress.cache.entries) == 4  # the linear layers; the embedding decodes on lookup
        torch.testing.assert_close(outputs(cached, ids()), first)
        torch.testing.assert_close(first, outputs(plain, ids()))
        cached.aecompress.groups["key"].members[0].latents.mul_(0.5)
        plain.aecompress.groups["key"].members[0].latents.mul_(0.5)
        torch.testing.assert_close(outputs(cached, ids()), outputs(plain, ids()))
    small = load_compact(directory, materialize=False, cache=TINY["hidden"] ** 2 * 4)
    with torch.no_grad():
        outputs(small, ids())
    assert small.aecompress.cache.bytes <= TINY["hidden"] ** 2 * 4
    outputs(cached.train(), ids()).sum().backward()  # training never reads the cache
    assert cached.aecompress.groups["key"].members[0].latents.grad is not None


def test_method_without_runtime_form_names_the_group(tmp_path, monkeypatch):
    directory = _baseline_export(tmp_path, "llama", "svd")
    monkeypatch.setitem(methods.METHODS, "svd", dataclasses.replace(methods.METHODS["svd"], runtime=None))
    with pytest.raises(AECompressError, match=r"group 'embed_tokens' uses method 'svd', which has no per-layer"):
        load_compact(directory, materialize=False)
    load_compact(directory)  # the decoded form still loads


def test_decoded_directory_says_what_to_do(tmp_path, tiny_dirs):
    fit_and_export(tmp_path, tiny_dirs["bert"], ["key"])
    with pytest.raises(AECompressError, match=r"is a decoded export.*--format compact"):
        load_compact(tmp_path / "decoded", materialize=False)
    with pytest.raises(AECompressError, match=r"plain transformers checkpoint.*--format compact"):
        load_runtime(tiny_dirs["bert"])
    with pytest.raises(AECompressError, match=r"cache=True applies only to the run-time form"):
        load_compact(tmp_path / "compact", cache=True)


def test_runtime_bench_command(ae_exports, capsys):
    from aecompress.cli import main

    main(["runtime-bench", "--directory", str(ae_exports("llama")), "--tokens", "8", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "resident params: decoded / run-time" in out and "max |decoded - run-time|" in out


def test_runtime_bench_generation_mode(ae_exports, tiny_dirs, capsys):
    """``--new_tokens`` generates from the export (run-time form) and each ``--compare`` model, one line each."""
    from aecompress.cli import main

    export = str(ae_exports("llama"))
    capsys.readouterr()  # what making the export printed
    main(["runtime-bench", "--directory", export, "--tokens", "6", "--new_tokens", "3", "--threads", "1",
          "--compare", f"[{tiny_dirs['llama']}]"])
    lines = capsys.readouterr().out.splitlines()
    assert "run-time" in lines[2] and "transformers" in lines[1] and lines[1].endswith("3/3")
    assert "6-token random prompt, 3 new tokens" in lines[3]


def test_evaluate_runs_the_runtime_form(tiny_lm, tmp_path, capsys):
    """``aecompress evaluate --runtime`` measures the run-time form, and equals the decoded form."""
    from aecompress.cli import main
    from aecompress.core.groups import extract_rows
    from aecompress.core.selection import select_groups
    from aecompress.formats.export import export
    from aecompress.formats.sources import load_model
    from aecompress.methods import compress

    model, source, auto_class = load_model(str(tiny_lm["model"]))
    forms = {g.name: compress("svd", g, extract_rows(model, g), Budget.of_ratio(2.0)) for g in select_groups(model, ["k_proj"])}
    export(model, forms, source, auto_class, str(tiny_lm["model"]), str(tmp_path / "c"), "compact")
    text = f"{tiny_lm['text']}:all[:256]"
    scores = []
    for extra in ([], ["--runtime"]):
        out = tmp_path / f"{len(extra)}.json"
        main(["evaluate", "--model", str(tmp_path / "c"), "--data", text, "--window", "64", "--json", str(out), *extra])
        scores.append(__import__("json").loads(out.read_text())["perplexity"])
    assert abs(scores[0] - scores[1]) < 1e-3 * scores[0]
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(tiny_lm["model"]), "--data", text, "--runtime"])
    assert "needs a compact export" in capsys.readouterr().err
