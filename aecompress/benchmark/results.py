"""The benchmark's results: an append-only CSV of measured figures (tables and plots: :mod:`.report`).

Every finished measurement is appended and flushed at once, so a killed
benchmark loses nothing it finished, and a rerun skips what is already there.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from aecompress.core.errors import AECompressError

COLUMNS = (
    "model", "group", "method", "target_ratio", "achieved_ratio", "stored_numbers", "stored_bytes",
    "split", "metric", "value", "seconds", "note",
    "target_bits", "bits_per_weight", "whole_bits_per_weight", "peak_rss_mb",
)
"""The CSV's columns; files written before the last four existed are read with those empty."""


@dataclass
class Row:
    """One measured figure (or one failure, with ``metric == "failed"`` and the reason in ``note``)."""

    model: str
    group: str
    method: str
    target_ratio: float | str
    achieved_ratio: float | str
    stored_numbers: int | str
    stored_bytes: int | str
    split: str
    metric: str
    value: float | str
    seconds: float | str
    note: str = ""
    target_bits: float | str = ""
    bits_per_weight: float | str = ""
    whole_bits_per_weight: float | str = ""
    peak_rss_mb: float | str = ""

    def key(self) -> tuple[str, str, str, str]:
        """What identifies one benchmark job: model, group, method, and its target (bits per weight, else ratio)."""
        return self.model, self.group, self.method, target_label(self.target_ratio, self.target_bits)


def target_label(ratio: float | str, bits: float | str = "") -> str:
    """A job's target as shown and keyed: ``3bpw`` for a bits budget, else the ratio."""
    if bits not in ("", None):
        return f"{float(bits):g}bpw"
    return _ratio_text(ratio)


def _ratio_text(ratio: float | str) -> str:
    try:
        return f"{float(ratio):g}"
    except ValueError:
        return str(ratio)


class ResultsCSV:
    """``results.csv``: read once, then appended row by row."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[Row] = list(self._read()) if self.path.is_file() else []
        if self.path.is_file() and self._header() != COLUMNS:  # an older file: rewrite it with every column
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(_formatted(row) for row in self.rows)
            os.replace(tmp, self.path)

    def _header(self) -> tuple[str, ...]:
        with open(self.path, newline="") as fh:
            return tuple(next(csv.reader(fh), []))

    def _read(self) -> Iterable[Row]:
        with open(self.path, newline="") as fh:
            reader = csv.DictReader(fh)
            found = tuple(reader.fieldnames or ())
            if found != COLUMNS[: len(found)] or len(found) < COLUMNS.index("note") + 1:
                raise AECompressError(f"{self.path} has columns {list(found)}, not a benchmark's {list(COLUMNS)}; "
                                      "give another --out_dir")
            for record in reader:
                if None in record.values() or None in record:  # a line cut short by a kill
                    continue
                yield Row(**{f.name: record.get(f.name, "") for f in fields(Row)})

    def done(self, model: str, group: str, method: str, ratio: float | str, bits: float | str = "") -> bool:
        """Whether this job already has rows (a result or a recorded failure)."""
        key = (model, group, method, target_label(ratio, bits))
        return any(r.key() == key for r in self.rows)

    def add(self, rows: list[Row]) -> None:
        """Append rows and force them to disk before returning."""
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow(_formatted(row))
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.extend(rows)


def _formatted(row: Row) -> dict:
    out = asdict(row)
    out["target_ratio"] = _ratio_text(out["target_ratio"])
    for key in ("achieved_ratio", "value", "seconds", "bits_per_weight", "whole_bits_per_weight", "peak_rss_mb"):
        if isinstance(out[key], float):
            out[key] = f"{out[key]:.6g}"
    return out


def value(text: float | str) -> float:
    """A CSV cell as a number (NaN where it holds none)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def by_group(cells: dict[tuple[str, str], dict]) -> list[tuple[tuple[str, str], dict]]:
    """Rows grouped by group (in order of first appearance), methods in order of first appearance.

    A resumed benchmark appends new methods at the end of the CSV; the table still
    reads one group at a time.
    """
    groups = list(dict.fromkeys(g for g, _ in cells))
    methods = list(dict.fromkeys(m for _, m in cells))
    return sorted(cells.items(), key=lambda item: (groups.index(item[0][0]), methods.index(item[0][1])))
