"""Calibration statistics: exact on a toy model, sane on tiny transformers, cached safely."""

import warnings

import pytest
import torch
import transformers
from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.core.selection import select_groups
from aecompress.data import calibration, statistics
from aecompress.data.calibration import collect
from tests.conftest import TINY, build_tiny, tiny_config


def _ids(windows: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab"], (windows, length), generator=torch.Generator().manual_seed(seed))


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).eval()


def test_covariance_and_fisher_match_their_definitions():
    model, ids = _toy(), torch.randint(0, 50, (5, 7), generator=torch.Generator().manual_seed(1))
    (group,) = select_groups(model, ["1.weight"])
    stats = collect(model, [group], ids, batch_size=2)[group.name]
    x = model[0](ids).reshape(-1, 8).double()
    torch.testing.assert_close(stats.covariances[0], x.T @ x / x.shape[0])
    assert stats.tokens == ids.numel() and stats.member_rows == [6]

    # Embedding loss: squared gradients of <eps, mean-pooled output>, one fixed-seed eps per window.
    gen, expected = torch.Generator().manual_seed(0), torch.zeros(6, dtype=torch.float64)
    for window in ids.split(1):
        model.zero_grad()
        pooled = model(window).mean(dim=1)
        (torch.randn(pooled.shape, generator=gen) * pooled).sum().backward()
        expected += model[1].weight.grad.double().pow(2).sum(dim=1)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(stats.fisher[0], expected.sqrt())


@pytest.mark.parametrize("family,modules", [
    ("bert", ["query", "key", "word_embeddings"]),
    ("gpt2", ["query", "key", "mlp_fc"]),
    ("llama", ["k_proj", "down_proj"]),
])
def test_tiny_models_give_well_formed_statistics(family, modules):
    model = build_tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    groups = select_groups(model, modules)
    stats = collect(model, groups, _ids())
    for g in groups:
        s = stats[g.name]
        assert len(s.fisher) == len(g.members) and torch.cat(s.fisher).shape == (g.rows,)
        embedding = "embed" in g.name or g.name == "wte"
        # An embedding's rows for unseen (or padding) tokens get no gradient.
        assert (torch.cat(s.fisher) >= 0).all() if embedding else (torch.cat(s.fisher) > 0).all()
        for cov in s.covariances:
            if embedding:
                assert cov is None
                continue
            assert cov.shape == (g.width, g.width) and cov.dtype == torch.float64
            torch.testing.assert_close(cov, cov.T)
            assert torch.linalg.eigvalsh(cov).min() > -1e-9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    if family == "gpt2":  # query and key are parts of one fused c_attn with one input
        assert torch.equal(stats["query"].covariances[0], stats["key"].covariances[0])
    if family == "bert":
        assert stats["word_embeddings"].mean_covariance() is None


def test_masked_lm_head_gives_fisher_weights():
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(tiny_config("bert")).eval()
    (group,) = select_groups(model, ["key"])
    assert calibration.loss_kind(model) == "masked"
    fisher = collect(model, [group], _ids(), what=("fisher",))[group.name].fisher
    assert torch.cat(fisher).gt(0).all()


def test_cache_round_trip_and_corruption_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("AECOMPRESS_CACHE", str(tmp_path))
    model, ids = build_tiny("llama"), _ids()
    groups = select_groups(model, ["k_proj", "q_proj"])
    first = collect(model, groups, ids, cache_key="tiny-llama")
    files = sorted((tmp_path / "calibration").glob("*.safetensors"))
    assert len(files) == 4  # one per group and statistic

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    with monkeypatch.context() as patch:
        patch.setattr(statistics, "covariances", fail)
        patch.setattr(statistics, "fisher", fail)
        again = collect(model, groups, ids, cache_key="tiny-llama")
    for g in groups:
        assert all(torch.equal(a, b) for a, b in zip(first[g.name].covariances, again[g.name].covariances))
        assert all(torch.equal(a, b) for a, b in zip(first[g.name].fisher, again[g.name].fisher))

    files[0].write_bytes(files[0].read_bytes()[:50])
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = collect(model, groups, ids, cache_key="tiny-llama")
    for g in groups:
        assert all(torch.equal(a, b) for a, b in zip(first[g.name].covariances, rebuilt[g.name].covariances))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collect(model, groups, ids, cache_key="tiny-llama")  # the rebuilt file is valid again

    other = collect(model, groups, _ids(seed=1), what=("covariance",), cache_key="tiny-llama")
    assert not torch.equal(other["k_proj"].covariances[0], first["k_proj"].covariances[0])


@pytest.mark.parametrize("kwargs,match", [
    ({"what": ("hessian",)}, "unknown calibration statistic 'hessian'; valid: covariance, fisher"),
    ({"loss": "ranking"}, "unknown calibration loss 'ranking'; valid: auto, causal"),
    ({"input_ids": torch.rand(2, 4)}, "integer tensor of shape"),
    ({"input_ids": torch.full((2, 4), 500)}, r"span 500..500, but the model's vocabulary is 0..95"),
])
def test_bad_calibration_input_is_refused(kwargs, match):
    model = build_tiny("llama")
    groups = select_groups(model, ["k_proj"])
    args = {"input_ids": _ids(), **kwargs}
    with pytest.raises(AECompressError, match=match):
        collect(model, groups, **args)
