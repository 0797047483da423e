"""Data specs, the split rule, the tokenized cache and token windows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

from aecompress.core.errors import AECompressError
from aecompress.data import corpora, specs, tokens
from tests.conftest import char_tokenizer

needs_gensim = pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="pip install --no-deps gensim")


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A directory of 12 .txt documents, 5 paragraphs each, one of them with non-ASCII UTF-8."""
    root = tmp_path / "corpus"
    root.mkdir()
    for d in range(12):
        lines = [f"document {d} paragraph {p} " + "word " * (5 + (d * 7 + p * 3) % 11) for p in range(5)]
        (root / f"doc{d:02d}.txt").write_text("\n\n".join(lines) + "\n")
    (root / "doc05.txt").write_bytes("caf\xe9 au lait\nna\xefve paragraph two\n".encode())
    return root


def _paragraphs(docs: list[str]) -> list[str]:
    return [p for d in docs for p in d.split("\n")]


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "source", "split", "start", "stop"),
    [
        ("wiki:validation", "wiki", "validation", None, None),
        ("wiki:all[:4096]", "wiki", "all", None, 4096),
        ("wiki:all[-8192:]", "wiki", "all", -8192, None),
        ("calibration[10:20]", "calibration", "all", 10, 20),
        ("lee", "lee", "all", None, None),
        ("polarity", "polarity", "all", None, None),
    ],
)
def test_parse_spec(spec, source, split, start, stop):
    parsed = specs.parse_spec(spec)
    assert (parsed.source, parsed.split, parsed.start, parsed.stop) == (source, split, start, stop)


def test_parse_local_spec(corpus):
    parsed = specs.parse_spec(f"{corpus}:test[:100]")
    assert parsed.source == str(corpus.resolve()) and parsed.split == "test" and parsed.stop == 100
    assert parsed.is_test


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("wikipedia", "unknown data 'wikipedia'; valid: wiki:validation, wiki:test"),
        ("wiki:train", "unknown wiki split in 'wiki:train'; valid: wiki:validation"),
        ("wiki", "unknown wiki split"),
        ("wiki:all[:x]", "bad token slice"),
        ("/no/such/file.txt:all", "unknown data"),
    ],
)
def test_bad_specs_list_the_valid_ones(spec, message):
    with pytest.raises(AECompressError, match=message.replace("[", r"\[")):
        specs.parse_spec(spec)


def test_a_path_needs_a_split(corpus):
    with pytest.raises(AECompressError, match=r"needs a split: .*:validation, .*:test, .*:calibration or .*:all"):
        specs.parse_spec(str(corpus))


def test_documents_refuse_a_token_slice():
    with pytest.raises(AECompressError, match="token streams only; give wiki:all"):
        corpora.documents("wiki:all[:10]")


# --------------------------------------------------------------------------- the split rule


def test_splits_are_deterministic_disjoint_and_ordered(corpus):
    parts = {s: corpora.documents(f"{corpus}:{s}") for s in specs.PATH_SPLITS}
    again = {s: corpora.documents(f"{corpus}:{s}") for s in specs.PATH_SPLITS}
    assert parts == again
    sets = {s: set(_paragraphs(parts[s])) for s in ("validation", "test", "calibration")}
    assert all(sets.values())
    assert not sets["validation"] & sets["test"]
    assert not sets["validation"] & sets["calibration"]
    assert not sets["test"] & sets["calibration"]
    everything = _paragraphs(parts["all"])
    assert everything[: len(_paragraphs(parts["test"]))] == _paragraphs(parts["test"])
    assert everything[-len(_paragraphs(parts["calibration"])) :] == _paragraphs(parts["calibration"])
    chars = sum(map(len, everything))
    for split in ("validation", "test", "calibration"):  # each about 10 %, never less
        share = sum(map(len, _paragraphs(parts[split]))) / chars
        assert 0.10 <= share < 0.2


def test_the_split_rule_is_capped():
    docs = [f"paragraph {i} " + "x" * 1000 for i in range(1000)]  # 1 MB
    test = corpora.split_documents(docs, "test")
    assert specs.SPLIT_CHARS <= sum(map(len, test)) < specs.SPLIT_CHARS + 1100


def test_tiny_text_must_be_used_whole(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("one line\nanother line\n")
    with pytest.raises(AECompressError, match="too small to split .* use it whole with :all"):
        corpora.documents(f"{small}:validation")
    assert corpora.documents(f"{small}:all") == ["one line\nanother line"]


def test_utf8_files_are_read_and_latin1_ones_refused_not_guessed(corpus):
    assert "café au lait\nnaïve paragraph two" in corpora.documents(f"{corpus}:all")
    (corpus / "doc05.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(AECompressError, match=r"doc05.txt' is not UTF-8 \(byte 3"):
        corpora.documents(f"{corpus}:all")


def test_datasets_directory(tmp_path, corpus):
    import datasets

    rows = corpora.documents(f"{corpus}:all")
    datasets.Dataset.from_dict({"text": rows, "n": list(range(len(rows)))}).save_to_disk(str(tmp_path / "ds"))
    assert corpora.documents(f"{tmp_path / 'ds'}:all") == rows
    assert corpora.documents(f"{tmp_path / 'ds'}:validation") == corpora.documents(f"{corpus}:validation")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(AECompressError, match="several splits \\(train\\); give one of them"):
        corpora.documents(f"{tmp_path / 'dd'}:all")


@needs_gensim
def test_packaged_splits_are_disjoint():
    from collections import Counter

    # Splits are disjoint by position; headings such as "History" recur in many articles.
    counts = Counter(_paragraphs(corpora.documents("wiki:all")))
    wiki = {s: {p for p in _paragraphs(corpora.documents(f"wiki:{s}")) if counts[p] == 1}
            for s in ("validation", "test", "calibration")}
    assert all(len(v) > 100 for v in wiki.values())
    assert not wiki["validation"] & wiki["test"]
    assert not wiki["validation"] & wiki["calibration"]
    assert not wiki["test"] & wiki["calibration"]
    assert len(corpora.wiki_documents()) == 106
    calibration = corpora.documents("calibration")
    assert calibration[: len(corpora.news_documents())] == list(corpora.news_documents())
    assert not set(_paragraphs(calibration)) & (wiki["validation"] | wiki["test"])
    assert len(corpora.documents("lee")) == 50 and corpora.lee_ratings().shape == (1225,)
    sentences, labels = corpora.polarity_sentences()
    assert len(sentences) == 200 and int(labels.sum()) == 100


def test_wikitext_cleaning():
    markup = (
        "{{Infobox|a={{nested}}}}'''Bold''' and [[Target|label]] or [[Plain]].<ref>cite</ref>\n"
        "== Heading ==\n[[File:x.png|thumb|a [[link]] caption]]\n* item [http://x.org site]\n{| class=t\n|cell\n|}\n"
    )
    assert corpora.clean_wikitext(markup) == ["Bold and label or Plain.", "Heading", "item site"]


# --------------------------------------------------------------------------- tokens


def test_token_ids_are_cached_and_sliced(tmp_path, cache, corpus):
    tokenizer = char_tokenizer(tmp_path / "tok")
    ids = tokens.token_ids(f"{corpus}:validation", tokenizer)
    docs = corpora.documents(f"{corpus}:validation")
    expected = []
    for doc in docs:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    assert ids.tolist() == expected
    assert len(list((cache / "text").iterdir())) == 1
    assert torch.equal(tokens.token_ids(f"{corpus}:validation[:7]", tokenizer), ids[:7])
    assert torch.equal(tokens.token_ids(f"{corpus}:validation[-5:]", tokenizer), ids[-5:])
    assert len(list((cache / "text").iterdir())) == 1, "slices reuse the unsliced cache"
    with pytest.raises(AECompressError, match="is empty"):
        tokens.token_ids(f"{corpus}:validation[5:5]", tokenizer)


def test_a_corrupted_cache_is_rebuilt(tmp_path, cache, corpus, caplog):
    tokenizer = char_tokenizer(tmp_path / "tok")
    ids = tokens.token_ids(f"{corpus}:test", tokenizer)
    (entry,) = (cache / "text").iterdir()
    manifest = entry / "aecompress-text.json"
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**meta, "sha256": "0" * 64}))  # the stored ids no longer match
    assert torch.equal(tokens.token_ids(f"{corpus}:test", tokenizer), ids)
    assert "rebuilding" in caplog.text
    assert json.loads(manifest.read_text())["sha256"] == meta["sha256"]
    for arrow in (entry / "tokens").glob("*.arrow"):  # a truncated data file
        arrow.write_bytes(arrow.read_bytes()[:50])
    caplog.clear()
    assert torch.equal(tokens.token_ids(f"{corpus}:test", tokenizer), ids)
    assert "rebuilding" in caplog.text


def test_the_cache_key_follows_the_tokenizer(tmp_path, cache, corpus):
    tokens.token_ids(f"{corpus}:test", char_tokenizer(tmp_path / "a"))
    vocab = transformers.AutoTokenizer.from_pretrained(tmp_path / "a").get_vocab()
    other = transformers.BertTokenizerFast(vocab=vocab, do_lower_case=False)
    tokens.token_ids(f"{corpus}:test", other)
    assert len(list((cache / "text").iterdir())) == 2


def test_windows():
    ids = torch.arange(10)
    assert tokens.windows(ids, 4, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert tokens.windows(ids, 4, 2).shape == (4, 4)
    with pytest.raises(AECompressError, match="text has 10 tokens, shorter than one window of 16"):
        tokens.windows(ids, 16, 16)
    with pytest.raises(AECompressError, match="stride in 1..window"):
        tokens.windows(ids, 4, 5)
