"""The benchmark's results: an append-only CSV, a Markdown table and a plot.

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

COLUMNS = (
    "model", "group", "method", "target_ratio", "achieved_ratio", "stored_numbers", "stored_bytes",
    "split", "metric", "value", "seconds", "note",
)
LOWER_IS_BETTER = {"perplexity", "mlm_perplexity"}


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

    def key(self) -> tuple[str, str, str, str]:
        """What identifies one benchmark job: model, group, method, target ratio."""
        return self.model, self.group, self.method, _ratio_text(self.target_ratio)


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

    def _read(self) -> Iterable[Row]:
        with open(self.path, newline="") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise ValueError(f"{self.path} has columns {reader.fieldnames}, expected {list(COLUMNS)}")
            for record in reader:
                if None in record.values() or None in record:  # a line cut short by a kill
                    continue
                yield Row(**{f.name: record[f.name] for f in fields(Row)})

    def done(self, model: str, group: str, method: str, ratio: float | str) -> bool:
        """Whether this job already has rows (a result or a recorded failure)."""
        key = (model, group, method, _ratio_text(ratio))
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
    for key in ("achieved_ratio", "value", "seconds"):
        if isinstance(out[key], float):
            out[key] = f"{out[key]:.6g}"
    return out


def _value(text: float | str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _by_group(cells: dict[tuple[str, str], dict]) -> list[tuple[tuple[str, str], dict]]:
    """Rows grouped by group (in order of first appearance), methods in order of first appearance.

    A resumed benchmark appends new methods at the end of the CSV; the table still
    reads one group at a time.
    """
    groups = list(dict.fromkeys(g for g, _ in cells))
    methods = list(dict.fromkeys(m for _, m in cells))
    return sorted(cells.items(), key=lambda item: (groups.index(item[0][0]), methods.index(item[0][1])))


def markdown(rows: list[Row], split: str) -> str:
    """One table per metric: the original first, then group x method against target ratio."""
    ratios = sorted({_value(r.target_ratio) for r in rows if r.method != "original"} - {math.nan})
    metrics = sorted({r.metric for r in rows if r.split == split and r.metric != "failed"})
    lines = [f"# Results on `{split}`", ""]
    for metric in metrics:
        arrow = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
        lines += [f"## {metric} ({arrow})", ""]
        lines.append("| group | method | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |")
        lines.append("|---|---|" + "---|" * len(ratios))
        original = [r for r in rows if r.method == "original" and r.metric == metric and r.split == split]
        if original:
            lines.append(f"| (all) | original | {_value(original[-1].value):.4g} |" + " |" * (len(ratios) - 1))
        cells: dict[tuple[str, str], dict[float, str]] = {}
        best: dict[tuple[str, float], float] = {}
        pick = min if metric in LOWER_IS_BETTER else max
        for r in rows:
            if r.method == "original" or r.split != split or r.metric not in (metric, "failed"):
                continue
            cell = "failed" if r.metric == "failed" else f"{_value(r.value):.4g}"
            slot = cells.setdefault((r.group, r.method), {})
            if r.metric == metric or _value(r.target_ratio) not in slot:
                slot[_value(r.target_ratio)] = cell
            if r.metric == metric and not math.isnan(_value(r.value)):
                key = (r.group, _value(r.target_ratio))
                best[key] = pick(best.get(key, _value(r.value)), _value(r.value))
        for (group, method), by_ratio in _by_group(cells):
            shown = [f"**{c}**" if c == f"{best.get((group, x), math.nan):.4g}" else c
                     for x, c in ((x, by_ratio.get(x, "")) for x in ratios)]
            lines.append(f"| {group} | {method} | " + " | ".join(shown) + " |")
        lines.append("")
    if len(metrics):
        lines += ["The best value of each group at each ratio is in bold.", ""]
    failures = [r for r in rows if r.metric == "failed"]
    if failures:
        lines += ["## Failed runs", ""]
        lines += [f"- {r.group} / {r.method} / ratio {_value(r.target_ratio):g}: {r.note}" for r in failures]
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[Row], split: str, path: Path) -> Path | None:
    """Quality against target ratio, one panel per group and metric, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    measured = [r for r in rows if r.split == split and r.metric != "failed"]
    groups = list(dict.fromkeys(r.group for r in measured if r.method != "original"))
    metrics = sorted({r.metric for r in measured if r.method != "original"})
    if not groups:
        return None
    # One row per group, one column per metric, so the figure stays readable as both grow.
    fig, axes = plt.subplots(len(groups), len(metrics), figsize=(4.8 * len(metrics), 3.6 * len(groups)), squeeze=False)
    panels = [(g, m) for g in groups for m in metrics]
    # One style per method in every panel; past ten methods the default colour cycle repeats.
    names = list(dict.fromkeys(r.method for r in measured if r.method != "original"))
    palette = plt.get_cmap("tab20")
    styles = {name: _style(name, palette(i % 20)) for i, name in enumerate(names)}
    for ax, (group, metric) in zip(axes.flatten(), panels):
        for method in dict.fromkeys(r.method for r in measured if r.group == group and r.method != "original"):
            points = sorted(
                (_value(r.target_ratio), _value(r.value))
                for r in measured
                if r.group == group and r.method == method and r.metric == metric
            )
            if points:
                ax.plot(*zip(*points), label=method, **styles[method])
        for r in measured:
            if r.method == "original" and r.metric == metric:
                ax.axhline(_value(r.value), color="black", linestyle="--", linewidth=1, label="original")
                break
        if metric in LOWER_IS_BETTER:
            ax.set_yscale("log")
        ax.set_xscale("log")
        ratios = sorted({_value(r.target_ratio) for r in measured if r.group == group and r.method != "original"})
        ax.set_xticks(ratios, [f"{x:g}" for x in ratios])  # the measured ratios, not powers of ten
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("compression ratio (float32 bytes / stored bytes)")
        ax.set_ylabel(metric)
        ax.set_title(group)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _style(method: str, color) -> dict:
    """Autoencoder rows (``ae...``) stand out: thicker lines and star markers."""
    if method.startswith("ae"):
        return {"color": color, "marker": "*", "markersize": 9, "linewidth": 2.2}
    return {"color": color, "marker": "o", "markersize": 4, "linewidth": 1.2}
