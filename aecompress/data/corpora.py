"""The documents a data spec names: packaged real text, a user's own files, and the split rule.

The packaged text comes from gensim's test data (106 Wikipedia articles, 300 Lee news
articles, the 50 rated Lee documents, 200 Pang-Lee polarity sentences), found on disk
without importing gensim. The split rule is in :mod:`aecompress.data.specs`.
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from aecompress.core.errors import AECompressError
from aecompress.data.specs import SPLIT_CHARS, SPLIT_FRACTION, Spec, parse_spec

_GENSIM_INSTALL = "pip install --no-deps gensim"
_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
def gensim_data_dir() -> Path:
    """gensim's test data folder, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise AECompressError(f"the packaged text needs gensim's data files; install them with: {_GENSIM_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def read_text(path: Path) -> str:
    """A file's text: UTF-8 where it is valid, else Windows-1252/latin-1 (several gensim files are)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:
            return raw.decode("latin-1")


_WIKI_DROP = [
    re.compile(r"<!--.*?-->", re.S),
    re.compile(r"<ref[^>/]*/>", re.I),
    re.compile(r"<ref[^>]*>.*?</ref>", re.I | re.S),
    re.compile(r"<(gallery|math|timeline|score|syntaxhighlight|source|pre|imagemap)[^>]*>.*?</\1>", re.I | re.S),
]
_WIKI_SUBS = [
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]"), r"\1"),  # [http://x label] -> label
    (re.compile(r"\[(?:https?:)?//[^\]]*\]"), ""),
    (re.compile(r"'{2,}"), ""),  # bold and italics
    (re.compile(r"<[^>]+>"), ""),  # remaining HTML tags
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),  # headings keep their text
    (re.compile(r"^[*#:;]+\s*", re.M), ""),  # list and indent markers
    (re.compile(r"__[A-Z]+__"), ""),  # __NOTOC__ and friends
    (re.compile(r"[ \t]+"), " "),
]
_NON_ARTICLE = re.compile(r"^\s*(thumb|right|left|px|\d+px)\b", re.I)


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ ... close`` spans (templates, tables), nesting included."""
    marks = re.compile(f"{re.escape(open_)}|{re.escape(close)}")
    out, depth, kept = [], 0, 0
    for found in marks.finditer(text):
        if found.group() == open_:
            if depth == 0:
                out.append(text[kept : found.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                kept = found.end()
    if depth == 0:
        out.append(text[kept:])
    return "".join(out)


def _strip_file_links(text: str) -> str:
    """Drop [[File:...]], [[Image:...]] and [[Category:...]] links, whose captions may nest links."""
    pattern = re.compile(r"\[\[(File|Image|Category|[a-z]{2,3}(-[a-z]+)?):", re.I)
    while True:
        found = pattern.search(text)
        if not found:
            return text
        depth, i = 0, found.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
                if depth == 0:
                    break
            else:
                i += 1
        text = text[: found.start()] + text[i:]


def clean_wikitext(markup: str) -> list[str]:
    """Wikitext to plain paragraphs: templates, tables, references, files and markup removed."""
    text = html.unescape(markup)
    for pattern in _WIKI_DROP:
        text = pattern.sub("", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _strip_file_links(text)
    for pattern, repl in _WIKI_SUBS:
        text = pattern.sub(repl, text)
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if len(line) < 2 or _NON_ARTICLE.match(line) or line.startswith(("|", "!")):
            continue
        paragraphs.append(line)
    return paragraphs


@functools.lru_cache(maxsize=1)
def wiki_documents() -> tuple[str, ...]:
    """The 106 articles (redirects and non-article pages dropped), title first, paragraphs by line."""
    path = gensim_data_dir() / _WIKI
    docs = []
    with bz2.open(path) as fh:
        for _, element in ET.iterparse(fh):
            if not element.tag.endswith("}page"):
                continue
            namespace = element.findtext("{*}ns")
            redirect = element.find("{*}redirect") is not None
            markup = element.findtext(".//{*}text") or ""
            title = element.findtext("{*}title") or ""
            if namespace == "0" and not redirect:
                paragraphs = clean_wikitext(markup)
                if paragraphs:
                    docs.append("\n".join([title, *paragraphs]))
            element.clear()
    return tuple(docs)


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def user_text(path: Path) -> str:
    """A user's text file: UTF-8 only; binary or other encodings are refused, never guessed."""
    raw = Path(path).read_bytes()
    if b"\0" in raw:
        raise AECompressError(f"{str(path)!r} holds NUL bytes: it is binary, not text; give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise AECompressError(
            f"{str(path)!r} is not UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r}); convert it to UTF-8"
        ) from None


def _user_lines(path: Path) -> list[str]:
    return [line.strip() for line in user_text(path).splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def news_documents() -> tuple[str, ...]:
    """The 300 Lee background news articles, one per line."""
    return tuple(_lines(gensim_data_dir() / "lee_background.cor"))


@functools.lru_cache(maxsize=1)
def lee_documents() -> tuple[str, ...]:
    """The 50 Lee documents that were rated for similarity."""
    return tuple(_lines(gensim_data_dir() / "lee.cor"))


def lee_ratings() -> torch.Tensor:
    """Human similarity ratings of the Lee documents, one per pair i < j (1,225 values)."""
    rows = [[float(x) for x in line.split()] for line in _lines(gensim_data_dir() / "similarities0-1.txt")]
    matrix = torch.tensor(rows, dtype=torch.float64)
    n = len(lee_documents())
    if matrix.shape != (n, n):
        raise AECompressError(f"similarities0-1.txt holds a {tuple(matrix.shape)} matrix; expected ({n}, {n})")
    i, j = torch.triu_indices(n, n, offset=1)
    return matrix[i, j]


def polarity_sentences() -> tuple[list[str], torch.Tensor]:
    """The 200 Pang-Lee sentences and their labels (1 = positive)."""
    sentences, labels = [], []
    for line in _lines(gensim_data_dir() / "pang_lee_polarity.cor"):
        label, _, sentence = line.partition(" ")
        if label not in ("__label__pos", "__label__neg"):
            raise AECompressError(f"unexpected polarity label {label!r} in pang_lee_polarity.cor")
        sentences.append(sentence)
        labels.append(int(label == "__label__pos"))
    return sentences, torch.tensor(labels)


def _local_documents(path: Path) -> list[str]:
    """Documents of a local text file, directory of .txt files, or datasets directory."""
    if path.is_file():
        return ["\n".join(_user_lines(path))]
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return _datasets_documents(path)
    files = sorted(path.rglob("*.txt"))
    if not files:
        raise AECompressError(f"directory {str(path)!r} holds no .txt files and is not a datasets directory")
    return ["\n".join(_user_lines(f)) for f in files]


def _datasets_documents(path: Path) -> list[str]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - any failure to read is the user's directory
        raise AECompressError(f"cannot read datasets directory {str(path)!r}: {str(err).splitlines()[0]}") from err
    if isinstance(data, datasets.DatasetDict):
        raise AECompressError(
            f"{str(path)!r} holds several splits ({', '.join(data)}); give one of them, "
            f"e.g. {path / next(iter(data))}:all"
        )
    strings = [name for name, feature in data.features.items() if getattr(feature, "dtype", None) == "string"]
    column = "text" if "text" in strings else (strings[0] if len(strings) == 1 else None)
    if column is None:
        raise AECompressError(
            f"datasets directory {str(path)!r} needs a 'text' column; string columns: {', '.join(strings) or 'none'}"
        )
    return ["\n".join(line.strip() for line in (t or "").splitlines() if line.strip()) for t in data[column]]


def split_documents(docs: list[str] | tuple[str, ...], split: str) -> list[str]:
    """Apply the split rule (module docstring) to documents in order.

    Args:
        docs: documents, paragraphs separated by newlines.
        split: ``validation``, ``test``, ``calibration`` or ``all``.
    """
    if split == "all":
        return [d for d in docs if d.strip()]
    paragraphs = [(i, p) for i, d in enumerate(docs) for p in d.split("\n") if p.strip()]
    if len(paragraphs) < 3:
        raise AECompressError(
            f"text with {len(paragraphs)} paragraph(s) is too small to split into validation, test and "
            "calibration; use it whole with :all"
        )
    total = sum(len(p) for _, p in paragraphs)
    budget = min(SPLIT_FRACTION * total, SPLIT_CHARS)

    def take(indices: range) -> list[int]:
        chosen, size = [], 0
        for k in indices:
            if size >= budget:
                break
            chosen.append(k)
            size += len(paragraphs[k][1])
        return chosen

    test = take(range(len(paragraphs)))
    validation = take(range(test[-1] + 1, len(paragraphs)))
    first_free = (validation or test)[-1] + 1
    calibration = sorted(take(range(len(paragraphs) - 1, first_free - 1, -1)))
    chosen = {"test": test, "validation": validation, "calibration": calibration}[split]
    if not chosen:
        raise AECompressError(
            f"text with {len(paragraphs)} paragraphs leaves nothing for the {split} split; use it whole with :all"
        )
    grouped: dict[int, list[str]] = {}
    for k in chosen:
        doc, paragraph = paragraphs[k]
        grouped.setdefault(doc, []).append(paragraph)
    return ["\n".join(ps) for ps in grouped.values()]


def documents(spec: str) -> list[str]:
    """The documents a data spec names (no token slice: slices apply to token streams)."""
    parsed = parse_spec(spec)
    if parsed.sliced:
        raise AECompressError(
            f"data {spec!r} has a token slice, which applies to token streams only; give {parsed.base}"
        )
    return parsed_documents(parsed)


def parsed_documents(parsed: Spec) -> list[str]:
    """The documents of a parsed spec (its token slice, if any, is for the caller to apply)."""
    if parsed.source == "wiki":
        return split_documents(wiki_documents(), parsed.split)
    if parsed.source == "calibration":
        return list(news_documents()) + split_documents(wiki_documents(), "calibration")
    if parsed.source == "lee":
        return list(lee_documents())
    if parsed.source == "polarity":
        return polarity_sentences()[0]
    docs = _local_documents(Path(parsed.source))
    size = sum(len(d.strip()) for d in docs)
    if size == 0:
        raise AECompressError(
            f"data {parsed.base!r} holds no text (0 characters); it needs at least one window of tokens "
            "(512 for perplexity and calibration by default)"
        )
    return split_documents(docs, parsed.split)
