"""Text for evaluation and calibration: sources, cleaning, splits and the tokenized cache.

A *data spec* names text. It is one of

- ``wiki:validation``, ``wiki:test``, ``wiki:calibration``, ``wiki:all``: 106 real Wikipedia
  articles from gensim's test data, cleaned to plain text;
- ``calibration``: 300 news articles (Lee background corpus) followed by ``wiki:calibration``;
- ``lee``: the 50 Lee documents (their human similarity ratings are read by :func:`lee_ratings`);
- ``polarity``: 200 labelled Pang-Lee sentences (see :func:`polarity_sentences`);
- ``PATH:SPLIT``: a text file (one document), a directory of ``.txt`` files (one document
  each), or a directory written by ``datasets``' ``save_to_disk`` (one document per row),
  with ``SPLIT`` one of ``validation``, ``test``, ``calibration`` or ``all``.

Any spec may end with a Python-style token slice, e.g. ``wiki:all[:4096]`` (the first 4,096
tokens of the whole stream) or ``calibration[-8192:]``. Slices apply to token streams.

**The split rule** (the same for every source, so it is deterministic and the splits are
disjoint): documents keep their order and are read as a sequence of paragraphs (non-empty
lines). ``test`` is the leading run of paragraphs holding 10 % of the characters, capped at
``SPLIT_CHARS``; ``validation`` is the run right after it, sized the same way; ``calibration``
is the trailing run, sized the same way. The middle is used by none of them. Select epochs and
hyperparameters on ``validation``, report on ``test``, fit anything data-aware on
``calibration``.
"""

from __future__ import annotations

import bz2
import contextlib
import functools
import hashlib
import html
import importlib.util
import json
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

from aecompress.errors import AECompressError

log = logging.getLogger(__name__)

SPLITS = ("wiki:validation", "wiki:test", "wiki:calibration", "wiki:all", "calibration", "lee", "polarity")
"""The packaged data specs. Local paths take ``:validation``, ``:test``, ``:calibration`` or ``:all``."""

PATH_SPLITS = ("validation", "test", "calibration", "all")
SPLIT_FRACTION = 0.10
"""Share of a source's characters in each of test, validation and calibration."""
SPLIT_CHARS = 100_000
"""Cap on each split's characters (about 20-25 thousand tokens), so evaluation stays cheap."""
CACHE_VERSION = 1

_GENSIM_INSTALL = "pip install --no-deps gensim"
_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_SLICE = re.compile(r"^(?P<base>.*?)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Spec:
    """A parsed data spec: the source, the split and an optional token slice."""

    source: str
    split: str
    start: int | None = None
    stop: int | None = None

    @property
    def base(self) -> str:
        """The spec without its token slice (what is cached)."""
        if self.source in ("calibration", "lee", "polarity"):
            return self.source
        return f"{self.source}:{self.split}"

    @property
    def sliced(self) -> bool:
        return self.start is not None or self.stop is not None

    @property
    def is_test(self) -> bool:
        """Whether this spec reads a test split, which nothing may select on."""
        return self.split == "test"


def parse_spec(spec: str) -> Spec:
    """Parse a data spec, with an error that lists the valid ones."""
    text = spec.strip()
    start = stop = None
    sliced = _SLICE.match(text)
    if sliced:
        text = sliced["base"]
        start = int(sliced["start"]) if sliced["start"] else None
        stop = int(sliced["stop"]) if sliced["stop"] else None
    elif text.endswith("]") and "[" in text:
        raise AECompressError(f"bad token slice in data {spec!r}; write e.g. wiki:all[:4096] or calibration[-8192:]")
    if text in ("calibration", "lee", "polarity"):
        return Spec(text, "all", start, stop)
    if text.startswith("wiki:") and text[5:] in PATH_SPLITS:
        return Spec("wiki", text[5:], start, stop)
    path, _, split = text.rpartition(":")
    if path and split in PATH_SPLITS and Path(path).expanduser().exists():
        return Spec(str(Path(path).expanduser().resolve()), split, start, stop)
    if Path(text).expanduser().exists():
        raise AECompressError(
            f"data {spec!r} needs a split: {text}:validation, {text}:test, {text}:calibration or {text}:all"
        )
    if text == "wiki" or path == "wiki":
        raise AECompressError(f"unknown wiki split in {spec!r}; valid: {', '.join(s for s in SPLITS if s.startswith('wiki'))}")
    raise AECompressError(
        f"unknown data {spec!r}; valid: {', '.join(SPLITS)}, or PATH:SPLIT for a local text file, "
        f"directory of .txt files or datasets directory (SPLIT: {', '.join(PATH_SPLITS)})"
    )


# --------------------------------------------------------------------------- sources


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
        return ["\n".join(_lines(path))]
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return _datasets_documents(path)
    files = sorted(path.rglob("*.txt"))
    if not files:
        raise AECompressError(f"directory {str(path)!r} holds no .txt files and is not a datasets directory")
    return ["\n".join(_lines(f)) for f in files]


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


# --------------------------------------------------------------------------- splits


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
    return _documents(parsed)


def _documents(parsed: Spec) -> list[str]:
    if parsed.source == "wiki":
        return split_documents(wiki_documents(), parsed.split)
    if parsed.source == "calibration":
        return list(news_documents()) + split_documents(wiki_documents(), "calibration")
    if parsed.source == "lee":
        return list(lee_documents())
    if parsed.source == "polarity":
        return polarity_sentences()[0]
    return split_documents(_local_documents(Path(parsed.source)), parsed.split)


# --------------------------------------------------------------------------- tokens


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how a tokenizer maps text to ids."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([tokenizer.eos_token_id, tokenizer.sep_token_id]).encode())
    return digest.hexdigest()


def separator_id(tokenizer) -> int | None:
    """The id placed between documents: EOS for causal tokenizers, else SEP, else none."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    if tokenizer.sep_token_id is not None:
        return int(tokenizer.sep_token_id)
    return None


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()


def _cache_path(parsed: Spec, docs: list[str], tokenizer) -> tuple[Path, str]:
    from aecompress.loading import cache_dir

    text_digest = hashlib.sha256("\x00".join(docs).encode()).hexdigest()
    key = hashlib.sha256(
        json.dumps([CACHE_VERSION, parsed.base, text_digest, tokenizer_fingerprint(tokenizer)]).encode()
    ).hexdigest()[:20]
    label = re.sub(r"[^\w.-]+", "_", parsed.base if parsed.source in ("wiki", "calibration", "lee", "polarity")
                   else f"{Path(parsed.source).name}:{parsed.split}")
    return cache_dir() / "text" / f"{label}-{key}", key


def _load_cached(path: Path, key: str) -> torch.Tensor | None:
    """The cached stream, or None if it is missing or does not match its manifest."""
    import datasets

    manifest = path / "aecompress-text.json"
    if not manifest.is_file():
        return None
    try:
        meta = json.loads(manifest.read_text())
        ids = _stream(datasets.load_from_disk(str(path / "tokens")))
    except Exception as err:  # noqa: BLE001 - any unreadable cache is rebuilt
        log.warning("token cache %s is unreadable (%s); rebuilding it", path, str(err).splitlines()[0] if str(err) else err)
        return None
    if meta.get("key") != key or meta.get("tokens") != ids.numel() or meta.get("sha256") != _ids_digest(ids):
        log.warning("token cache %s does not match its manifest; rebuilding it", path)
        return None
    return ids


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars for cache reads and writes (they are quick and would drown the output)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _tokenize(docs: list[str], tokenizer):
    """Each document's ids followed by the separator, one row per document, through ``datasets.map``."""
    import datasets

    sep = [separator_id(tokenizer)] if separator_id(tokenizer) is not None else []

    def encode(batch):
        out = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"ids": [ids + sep for ids in out]}

    table = datasets.Dataset.from_dict({"text": list(docs)})
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))})
    return table.map(encode, batched=True, remove_columns=["text"], features=features, keep_in_memory=True)


def _stream(table) -> torch.Tensor:
    """The documents' rows concatenated into one 1-D stream."""
    rows = table.with_format("numpy")["ids"]
    if not len(rows):
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in rows])


def token_ids(spec: str, tokenizer) -> torch.LongTensor:
    """The 1-D token stream of a data spec, token slice applied.

    Documents are tokenized without special tokens and joined with the tokenizer's
    EOS (or SEP) id. The unsliced stream is cached with ``datasets`` under
    ``<cache>/text/``, keyed by the spec, the text itself and the tokenizer; a cache
    whose checksum does not match is rebuilt.
    """
    from aecompress.atomic import atomic_directory

    parsed = parse_spec(spec)
    docs = _documents(parsed)
    path, key = _cache_path(parsed, docs, tokenizer)
    with _quiet_datasets():
        ids = _load_cached(path, key)
    if ids is None:
        with _quiet_datasets(), atomic_directory(path, overwrite=True) as tmp:
            table = _tokenize(docs, tokenizer)
            ids = _stream(table)
            table.save_to_disk(str(tmp / "tokens"))
            meta = {"key": key, "spec": parsed.base, "documents": len(docs), "tokens": ids.numel(),
                    "sha256": _ids_digest(ids)}
            (tmp / "aecompress-text.json").write_text(json.dumps(meta, indent=1) + "\n")
    if parsed.sliced:
        whole, ids = ids.numel(), ids[parsed.start : parsed.stop]
        if ids.numel() == 0:
            raise AECompressError(f"token slice of {spec!r} is empty; {parsed.base} has {whole} tokens")
    return ids


def windows(ids: torch.Tensor, window: int, stride: int) -> torch.LongTensor:
    """Full windows of ``window`` tokens starting every ``stride`` tokens, as ``[n, window]``.

    A tail shorter than a window is dropped (its tokens are counted by no window).
    """
    if window < 2 or stride < 1 or stride > window:
        raise AECompressError(f"window must be at least 2 and stride in 1..window; got window={window}, stride={stride}")
    if ids.numel() < window:
        raise AECompressError(f"text has {ids.numel()} tokens, shorter than one window of {window}; "
                              "use more text or a smaller --window")
    return ids.unfold(0, window, stride).contiguous()
