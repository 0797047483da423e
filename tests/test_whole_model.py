"""Whole models in bits per weight: fidelity metrics, budgets, allocation, and other packages' checkpoints."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from aecompress.cli import main
from aecompress.core.budget import Budget
from aecompress.core.groups import extract_rows
from aecompress.core.selection import select_groups
from aecompress.data.tokens import token_ids
from aecompress.evaluation import allocation
from aecompress.evaluation.causal import causal_token_scores, teacher_targets
from aecompress.evaluation.paired import paired_z
from aecompress.methods import compress, decode
from tests.conftest import build_tiny, char_tokenizer, fake_peer, write_config


def _ids(n: int = 640, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed))


def test_a_model_is_at_zero_kl_and_full_agreement_with_itself():
    model, ids = build_tiny("llama"), _ids()
    scores = causal_token_scores(model, ids, 64, 64, 4, teacher_targets(model, ids, 64, 64, 4))
    assert float(scores["kl"].abs().max()) < 1e-6 and bool((scores["agree"] == 1).all())


def test_kl_over_the_whole_vocabulary_is_exact_and_fewer_tokens_never_overstate_it():
    model, ids = build_tiny("llama"), _ids()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    chunks = ids.unfold(0, 64, 64)
    with torch.no_grad():
        p = model(input_ids=chunks).logits[:, :-1].log_softmax(-1)
        q = other(input_ids=chunks).logits[:, :-1].log_softmax(-1)
    exact = float((p.exp() * (p - q)).sum(-1).mean())
    estimates = {k: float(causal_token_scores(other, ids, 64, 64, 4, teacher_targets(model, ids, 64, 64, 4, k))["kl"].mean())
                 for k in (4, 32, 96)}
    assert estimates[96] == pytest.approx(exact, rel=1e-3)  # float32 logits, batched differently
    assert estimates[4] <= estimates[32] <= estimates[96] + 1e-9


def test_the_paired_z_of_kl_ranks_the_closer_model_first():
    model, ids = build_tiny("llama"), _ids(2048)
    targets = teacher_targets(model, ids, 64, 64, 4)
    far, near = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for a, b in zip(far.parameters(), near.parameters()):
            noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(2))
            a.add_(noise * 0.1)
            b.add_(noise * 0.01)
    kl_far = causal_token_scores(far, ids, 64, 64, 4, targets)["kl"]
    kl_near = causal_token_scores(near, ids, 64, 64, 4, targets)["kl"]
    assert paired_z("kl_to_original", kl_near, kl_far) > 2


def test_bits_per_weight_is_a_budget_and_refuses_a_ratio_beside_it(tiny_dirs, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_dirs["llama"], ["all"], tmp_path, **{
        "data.ratio": None, "data.bits_per_weight": 8.0, "model.encoder": "free", "model.decoder": "linear",
        "model.out_activation": "none", "model.init": "svd", "model.enforce_norm": False})
    main(["fit", "--config", str(cfg)])
    main(["export", "--config", str(cfg), "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"), "--out_dir",
          str(tmp_path / "out"), "--format", "compact"])
    meta = json.loads((tmp_path / "out" / "aecompress.json").read_text())
    assert meta["bits_per_weight"] <= 8.0 and all(g["bits_per_weight"] <= 8.0 for g in meta["groups"])
    assert {g["group"]["name"] for g in meta["groups"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"}
    assert meta["whole_model"]["bits_per_weight"] > meta["bits_per_weight"]  # embeddings stay float32
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg), "--data.ratio", "4"])
    assert "give data.ratio (4.0) or data.bits_per_weight (8.0), not both" in capsys.readouterr().err


def test_grouped_round_to_nearest_keeps_a_scale_and_zero_per_group_of_columns():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    group = select_groups(build_tiny("llama"), ["down_proj"])[0]
    w = torch.randn(group.rows, group.width, generator=torch.Generator().manual_seed(3))
    rowwise = compress("quantize", group, w, Budget.of_ratio(8.0), dtype="float16", code_bits=3)
    grouped = compress("quantize", group, w, Budget.of_ratio(8.0), dtype="float16", code_bits=3, group_size=32)
    assert grouped.tensors["scale"].shape == (group.rows, group.width // 32)
    assert float((decode(grouped) - w).norm()) < float((decode(rowwise) - w).norm())
    with pytest.raises(Exception, match="group_size 48 must divide"):
        compress("quantize", group, w, Budget.of_ratio(8.0), group_size=48)


def test_the_measured_allocation_spends_no_more_than_uniform_and_predicts_less_damage(tiny_lm):
    model = build_tiny("llama")
    tokenizer = char_tokenizer(tiny_lm["model"])
    groups = select_groups(model, ["all"])
    rows = {g.name: extract_rows(model, g) for g in groups}

    def at(group, budget):
        return compress("svd", group, rows[group.name], budget, codes="int8", dtype="float16")

    damage = allocation.damage_on(model, tokenizer, f"{tiny_lm['text']}:all", tokens=512)
    uniform = allocation.plan(model, groups, rows, at, damage, Budget.of_bits(8.0), "uniform")
    measured = allocation.plan(model, groups, rows, at, damage, Budget.of_bits(8.0), "measured")
    assert measured.stored_bytes <= uniform.stored_bytes
    assert all(torch.equal(extract_rows(model, g), rows[g.name]) for g in groups)  # measuring restored the model
    curves = allocation.sensitivities(model, groups, rows, at, damage, 8.0)
    at_target = sum(p[2] for c in curves.values() for p in c if p[0] == 8.0)
    assert sum(c.damage for c in measured.choices) <= at_target + 1e-12
    assert "allocation plan (measured) at 8 bits per weight" in measured.table(groups)


def test_solve_moves_bytes_to_the_group_that_suffers_more():
    curves = {"a": [(2.0, 100, 1.0), (4.0, 200, 0.9)], "b": [(2.0, 100, 5.0), (4.0, 200, 1.0)],
              "c": [(1.0, 50, 0.2), (2.0, 100, 0.1)]}
    chosen = allocation.solve(curves, 350, 2.0)  # uniform (2 bits each) spends 300
    assert chosen["b"][0] == 4.0 and chosen["c"][0] == 1.0 and sum(p[1] for p in chosen.values()) <= 350


def test_a_peer_is_measured_from_its_dense_checkpoint_at_the_size_of_its_own_format(tiny_lm, tmp_path):
    model = build_tiny("llama")
    peer = fake_peer(tmp_path, model, ["k_proj", "up_proj"])
    text = f"{tiny_lm['text']}:all"
    main(["benchmark", "--model", str(tiny_lm["model"]), "--groups", '[{"modules": ["k_proj", "up_proj"], "name": "kv"}]',
          "--methods", json.dumps([{"method": "external", "name": "peer", "options": {"path": str(peer)}},
                                    {"method": "quantize", "name": "rtn", "options": {"group_size": 16, "dtype": "float16"}}]),
          "--bits", "[4.5]", "--data", f"{text}[:512]", "--calibration", f"{text}[-1024:]",
          "--calibration_window", "64", "--out_dir", str(tmp_path / "bench")])
    with open(tmp_path / "bench" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    peer_rows = {r["metric"]: r for r in rows if r["method"] == "peer"}
    assert set(peer_rows) == {"kl_to_original", "kl_to_original_p99", "top1_agreement", "perplexity"}
    # 4 bits per code plus a float16 scale per 16 columns: 4 + 1 = 5 bits per weight, counted from the manifest
    assert float(peer_rows["kl_to_original"]["bits_per_weight"]) == pytest.approx(5.0)
    assert peer_rows["kl_to_original"]["target_ratio"] == "-"
    assert float(peer_rows["kl_to_original"]["value"]) > 0
    rtn = {r["metric"]: r for r in rows if r["method"] == "rtn"}
    assert float(rtn["kl_to_original"]["bits_per_weight"]) <= 4.5 and rtn["kl_to_original"]["target_bits"] == "4.5"
    assert all(float(r["peak_rss_mb"]) > 0 for r in rows if r["method"] != "original")
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "| peer | own size | 5.000 |" in table and (tmp_path / "bench" / "quality_vs_bits.png").is_file()


def test_evaluate_ranks_by_kl_with_perplexity_beside_it_and_pairs_the_kl(tiny_lm, tmp_path, capsys):
    model = build_tiny("llama")
    text = f"{tiny_lm['text']}:all"
    ids = token_ids(text, char_tokenizer(tiny_lm["model"]))
    assert len(ids) > 1000
    peer = fake_peer(tmp_path, model, ["k_proj"])
    char_tokenizer(peer / "dense")
    out = tmp_path / "r.json"
    main(["evaluate", "--model", str(peer / "dense"), "--reference", str(tiny_lm["model"]), "--data", text,
          "--window", "64", "--metrics", "[kl_to_original, top1_agreement, perplexity]", "--against",
          str(tiny_lm["model"]), "--json", str(out)])
    results = json.loads(out.read_text())
    assert results["kl_to_original_against"] == pytest.approx(0.0, abs=1e-6) and results["top1_agreement_against"] == 1
    assert results["kl_to_original"] > 0 and results["kl_to_original_z"] < 0  # the original is closer to itself
    assert not math.isnan(results["perplexity_z"])


def test_a_manifest_that_misses_a_weight_is_refused(tmp_path):
    model = build_tiny("llama")
    peer = fake_peer(tmp_path, model, ["k_proj"])
    group = select_groups(model, ["up_proj"])[0]
    with pytest.raises(Exception, match="did not compress 'model.layers.0.mlp.up_proj.weight'"):
        compress("external", group, extract_rows(model, group), Budget.of_ratio(4.0), path=str(peer))


def test_the_save_format_of_a_peer_stays_ours(tmp_path):
    """The peer's dense weights are read with safetensors only (never unpickled)."""
    save_file({"x": torch.zeros(1)}, tmp_path / "x.safetensors")
    import aecompress.methods.external as external

    assert "torch.load" not in open(external.__file__).read()
