"""The benchmark's results for people: one Markdown table per metric, and a plot of quality against size."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from aecompress.benchmark.results import Row, by_group, target_label, value
from aecompress.evaluation.catalog import lower_is_better


def markdown(rows: list[Row], split: str) -> str:
    """One table per metric: the original first, then group x method against target ratio."""
    ratios = sorted({value(r.target_ratio) for r in rows if r.method != "original"} - {math.nan})
    metrics = sorted({r.metric for r in rows if r.split == split and r.metric != "failed"})
    lines = [f"# Results on `{split}`", ""]
    for metric in metrics:
        arrow = "lower is better" if lower_is_better(metric) else "higher is better"
        lines += [f"## {metric} ({arrow})", ""]
        lines.append("| group | method | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |")
        lines.append("|---|---|" + "---|" * len(ratios))
        original = [r for r in rows if r.method == "original" and r.metric == metric and r.split == split]
        if original:
            lines.append(f"| (all) | original | {value(original[-1].value):.4g} |" + " |" * (len(ratios) - 1))
        cells: dict[tuple[str, str], dict[float, str]] = {}
        best: dict[tuple[str, float], float] = {}
        pick = min if lower_is_better(metric) else max
        for r in rows:
            if r.method == "original" or r.split != split or r.metric not in (metric, "failed"):
                continue
            cell = "failed" if r.metric == "failed" else f"{value(r.value):.4g}"
            slot = cells.setdefault((r.group, r.method), {})
            if r.metric == metric or value(r.target_ratio) not in slot:
                slot[value(r.target_ratio)] = cell
            if r.metric == metric and not math.isnan(value(r.value)):
                key = (r.group, value(r.target_ratio))
                best[key] = pick(best.get(key, value(r.value)), value(r.value))
        for (group, method), by_ratio in by_group(cells):
            shown = [f"**{c}**" if c == f"{best.get((group, x), math.nan):.4g}" else c
                     for x, c in ((x, by_ratio.get(x, "")) for x in ratios)]
            lines.append(f"| {group} | {method} | " + " | ".join(shown) + " |")
        lines.append("")
    if len(metrics):
        lines += ["The best value of each group at each ratio is in bold.", ""]
    return "\n".join(lines + _failed_runs(rows, lambda r: f"ratio {value(r.target_ratio):g}"))


def _failed_runs(rows: list[Row], label: Callable[[Row], str]) -> list[str]:
    """The report's closing section on jobs that failed, each named by ``label`` (its ratio, or its budget)."""
    failures = [r for r in rows if r.metric == "failed"]
    if not failures:
        return []
    return ["## Failed runs", "", *(f"- {r.group} / {r.method} / {label(r)}: {r.note}" for r in failures), ""]


def plot(rows: list[Row], split: str, path: Path, against: str = "ratio", trained: frozenset[str] = frozenset()) -> Path | None:
    """Quality against size, one panel per group and metric, one line per method.

    Args:
        trained: labels of the rows a trained method made, drawn to stand out.
        against: ``ratio`` (the target ratio, log scale) or ``bits`` (the achieved bits per weight,
            so methods at their own size, other packages' checkpoints, sit where they are).
    """
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
    styles = {name: _style(name in trained, palette(i % 20)) for i, name in enumerate(names)}
    for ax, (group, metric) in zip(axes.flatten(), panels):
        for method in dict.fromkeys(r.method for r in measured if r.group == group and r.method != "original"):
            points = sorted(
                (value(r.target_ratio if against == "ratio" else r.bits_per_weight), value(r.value))
                for r in measured
                if r.group == group and r.method == method and r.metric == metric
            )
            if points:
                ax.plot(*zip(*points), label=method, **styles[method])
        for r in measured:
            if r.method == "original" and r.metric == metric:
                ax.axhline(value(r.value), color="black", linestyle="--", linewidth=1, label="original")
                break
        if lower_is_better(metric):
            ax.set_yscale("log")
        if against == "ratio":
            ax.set_xscale("log")
            ratios = sorted({value(r.target_ratio) for r in measured if r.group == group and r.method != "original"})
            ax.set_xticks(ratios, [f"{x:g}" for x in ratios])  # the measured ratios, not powers of ten
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("compression ratio (float32 bytes / stored bytes)")
        else:
            ax.set_xlabel("bits per weight (compressed groups, as stored)")
        ax.set_ylabel(metric)
        ax.set_title(group)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _style(trained: bool, color) -> dict:
    """Rows of trained methods (the autoencoder's recipes) stand out: thicker lines and star markers."""
    if trained:
        return {"color": color, "marker": "*", "markersize": 9, "linewidth": 2.2}
    return {"color": color, "marker": "o", "markersize": 4, "linewidth": 1.2}


def whole_model_markdown(rows: list[Row], split: str) -> str:
    """One table per group for bits-per-weight benchmarks: every method at every budget, all metrics, costs.

    Sizes are achieved bits per weight (compressed groups, and the whole checkpoint), counted
    by the one accountant; methods at their own size (other packages' checkpoints) sit among them.
    """
    measured = [r for r in rows if r.split == split and r.metric != "failed"]
    metrics = list(dict.fromkeys(r.metric for r in measured))
    lines = [f"# Results on `{split}`", ""]
    original = {r.metric: value(r.value) for r in measured if r.method == "original"}
    if original:
        lines += ["Original: " + ", ".join(f"{m} {v:.4g}" for m, v in original.items()), ""]
    jobs: dict[tuple[str, str, str], dict] = {}
    for r in measured:
        if r.method != "original":
            job = jobs.setdefault((r.group, r.method, target_label(r.target_ratio, r.target_bits)), {"row": r})
            job[r.metric] = value(r.value)
    for group in dict.fromkeys(g for g, _, _ in jobs):
        lines += [f"## {group}", "",
                  "| method | budget | bits/weight | whole model bits/weight | " + " | ".join(
                      f"{m} ({'lower' if lower_is_better(m) else 'higher'} is better)" for m in metrics)
                  + " | seconds | peak MiB |",
                  "|---|---|---|---|" + "---|" * len(metrics) + "---|---|"]
        ordered = sorted(((k, v) for k, v in jobs.items() if k[0] == group),
                         key=lambda kv: (-value(kv[1]["row"].bits_per_weight), kv[0][1]))
        for (_, method, target), job in ordered:
            row = job["row"]
            cells = [f"{job[m]:.4g}" if m in job else "" for m in metrics]
            lines.append(f"| {method} | {target if target != '-' else 'own size'} | {value(row.bits_per_weight):.3f} | "
                         f"{value(row.whole_bits_per_weight):.3f} | " + " | ".join(cells)
                         + f" | {value(row.seconds):.1f} | {value(row.peak_rss_mb):.0f} |")
        lines.append("")
    return "\n".join(lines + _failed_runs(rows, lambda r: target_label(r.target_ratio, r.target_bits)))
