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

import re
from dataclasses import dataclass
from pathlib import Path

from aecompress.core.errors import AECompressError

SPLITS = ("wiki:validation", "wiki:test", "wiki:calibration", "wiki:all", "calibration", "lee", "polarity")
"""The packaged data specs. Local paths take ``:validation``, ``:test``, ``:calibration`` or ``:all``."""

PATH_SPLITS = ("validation", "test", "calibration", "all")
SPLIT_FRACTION = 0.10
"""Share of a source's characters in each of test, validation and calibration."""
SPLIT_CHARS = 100_000
"""Cap on each split's characters (about 20-25 thousand tokens), so evaluation stays cheap."""
_SLICE = re.compile(r"^(?P<base>.*?)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


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
        """Whether this spec reads a test split, which nothing may select on (the quick check by name;
        calibration text is also kept apart from test text by content, see :func:`held_out`)."""
        return self.split == "test"


HELD_OUT = ("wiki:test", "lee", "polarity")
"""The packaged text results are reported on: the wiki test split, and the Lee and polarity sets that the
sentence metrics score whole."""


def held_out(spec: str) -> tuple[str, ...]:
    """The texts a spec must share no text with to be calibrated or selected on, whatever its split is called.

    A packaged spec is held apart from every packaged held-out text (``wiki:all`` holds ``wiki:test``,
    ``calibration`` holds wiki text); a local one from its own source's test split.
    """
    parsed = parse_spec(spec)
    if parsed.source in ("wiki", "calibration", "lee", "polarity"):
        return HELD_OUT
    return (f"{parsed.source}:test",)


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
