"""The export's own model card (``README.md``): what was compressed, how, how big, how good, how to load it.

It replaces the original's card (which describes a different model) and keeps the original's
license. It names the original by hub id, package or directory name, never by a local path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from aecompress.formats.packaged import HUB_IDS, PACKAGED

CARD = "README.md"
_LICENSE = re.compile(r"^license:\s*(\S.*)$", re.M)


def original_license(source: str | Path) -> str | None:
    """The license in the original card's front matter, if the source directory has a card that says."""
    card = Path(source) / CARD
    if not card.is_file():
        return None
    text = card.read_text(errors="replace")
    front = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    found = _LICENSE.search(front)
    return found.group(1).strip().strip("'\"") if found else None


def _size_rows(meta: dict) -> list[str]:
    whole = meta.get("whole_model") or {}
    rows = [
        "| what | parameters | stored bytes | bits per weight | ratio (vs float32) |",
        "|---|---|---|---|---|",
        f"| compressed groups | {meta['original_numbers']:,} | {meta['stored_bytes']:,} | "
        f"{meta['bits_per_weight']:.3f} | {meta['achieved_ratio']:.3f} |",
    ]
    if whole:
        rows.append(f"| whole model | {whole['parameters']:,} | {whole['stored_bytes']:,} | "
                    f"{whole['bits_per_weight']:.3f} | {whole['ratio']:.3f} |")
    return rows


def _group_lines(meta: dict) -> list[str]:
    lines = []
    for entry in meta["groups"]:
        group = entry["group"]
        layers = sorted({m["layer"] for m in group["members"] if m["layer"] is not None})
        where = f"{len(group['members'])} matrices" + (f" (layers {layers[0]}-{layers[-1]})" if layers else "")
        lines.append(f"- `{group['name']}`: {group['rows']} x {group['width']} rows from {where}, method `{entry['method']}`, "
                     f"{entry.get('bits_per_weight', float('nan')):.3f} bits per weight, ratio {entry['ratio']:.3f}")
    return lines


def _quality_lines(report: dict | None, reproduce: str) -> list[str]:
    if not report:
        return ["Not measured with this export. Measure it against the original with:", "",
                "```bash", reproduce, "```"]
    metrics = report.get("metrics", [report["metric"]])
    lines = [f"Measured after fitting on `{report['split']}` (held out: nothing was selected on it), "
             f"{report['tokens_or_items']}; {report['direction']}.", "",
             "| model | bits per weight | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for row in report["rows"]:
        bpw = row.get("bits_per_weight")
        lines.append(f"| {row['name']} | {'-' if bpw is None else f'{bpw:.3f}'} | "
                     + " | ".join(f"{row[m]:.6g}" for m in metrics) + " |")
    return [*lines, "", "Reproduce the measurement of this export:", "", "```bash", reproduce, "```"]


def _tune_line(tune: dict | None) -> str:
    if not tune:
        return ("- Tune: none (`--tune_steps 0`): the codes and scales are as the method computed them, "
                "one matrix at a time.")
    if "blocks_kept" in tune:
        return (f"- Tune, block by block: only the stored scales (the codes kept as they are, the same bytes) of each "
                f"transformer block were fine-tuned for {tune['steps']} steps (Adam, lr {tune['lr']:g}) so that the "
                "block's outputs match the original block's on the calibration text: no labels, no task data. "
                f"The tune was kept in {tune['blocks_kept']} of {tune['blocks']} blocks"
                + (" (in the others it lowered nothing)." if tune["blocks_kept"] < tune["blocks"] else ".")
                + (" Then, on the whole model, " + _whole_tune(tune["model"]) if tune.get("model") else ""))
    return "- Tune: " + _whole_tune(tune)


def _whole_tune(tune: dict) -> str:
    """The whole-model tune: what it matched, how long, and whether it was kept."""
    top = "all" if tune.get("top_k") is None else f"top-{tune['top_k']}"
    outcome = ""
    if "objective_before" in tune:
        outcome = (f" Its objective on the calibration windows went from {tune['objective_before']:.4g} to "
                   f"{tune['objective_after']:.4g}; " + ("the tuned scales were kept." if tune.get("kept") else
                                                         "that is worse, so the untuned scales were kept."))
    return (f"only the stored scales (the codes kept as they are, the same bytes) were fine-tuned for "
            f"{tune['steps']} steps (Adam, lr {tune['lr']:g}, precision {tune.get('precision', '32-true')}) so that "
            f"this model's outputs match the original model's ({top} next-token probabilities for a language model, "
            "hidden states for an encoder) on the calibration text: no labels, no task data." + outcome)


def _made_lines(made: dict | None) -> list[str]:
    """How a ``compress`` export was made: method and options, calibration text, tune."""
    if not made:
        return []
    options = ", ".join(f"{k}: {json.dumps(v)}" for k, v in made["options"].items()) or "none"
    return [f"- Method: `{made['method']}` with options `{{{options}}}`"
            + (" (the method's defaults)" if made.get("defaults") else "")
            + f", {made['bits']:g} bits per weight, {made['allocation']} allocation, modules `[{', '.join(made['modules'])}]`.",
            f"- Calibration text: `{made['calibration']}`, {made['calibration_tokens']:,} tokens in windows of "
            f"{made['calibration_window']} (for the calibration statistics and the tune; never a test split).",
            _tune_line(made.get("tune")), ""]


def render(meta: dict, license_name: str | None, recipe: str | None, commands: list[str],
           report: dict | None, directory_name: str, made: dict | None = None) -> str:
    """The card's text."""
    original = meta["source_model"]
    hub = HUB_IDS.get(original)
    named = f"`{original}` ({hub}, {PACKAGED[original].split(' from ', 1)[-1]})" if hub else f"`{original}`"
    fmt = meta["format"].removeprefix("aecompress-")
    methods = sorted({g["method"] for g in meta["groups"]})
    load = (f"model = transformers.{meta['auto_class']}.from_pretrained(\"{directory_name}\")" if fmt != "compact"
            else f"model = aecompress.load_compact(\"{directory_name}\")  # or materialize=False: decoded just in time")
    if fmt == "compressed-tensors":
        load += "  # needs: pip install 'compressed-tensors>=0.15,<0.18'"
    reproduce = (f"aecompress evaluate --model {directory_name} --data {report['split'] if report else 'wiki:test'}"
                 + (f" --reference {original}" if report and report.get("needs_reference") else ""))
    front = ["---", f"license: {license_name or 'other'}", "library_name: transformers", "tags:", "- aecompress",
             "- compressed", f"- {fmt}"]
    if hub or (original and "/" in original):
        front.append(f"base_model: {hub or original}")
    lines = [*front, "---", "", f"# {original}, compressed with aecompress", "",
             f"{named} with {len(meta['groups'])} weight group(s) compressed offline by "
             f"{', '.join(f'`{m}`' for m in methods)}" + (f", recipe `{recipe}`" if recipe else "")
             + f" (aecompress {meta['aecompress_version']}, {fmt} format). The rest of the weights are the original's.",
             "", "## Size", "", *_size_rows(meta), "",
             *([f"This decoded export holds full-size {meta.get('dtype', 'float32')} weights, so plain transformers "
                "loads it as it is; the "
                "sizes above are what the compressed form stores (`aecompress export --format compact` keeps only that).",
                ""] if fmt == "decoded" else []),
             *(["The compressed matrices are stored as compressed-tensors `pack-quantized` integer codes (exactly the "
                "codes, scales and zero codes counted above); transformers decompresses them when it loads the model.",
                ""] if fmt == "compressed-tensors" else []),
             "Compressed groups:", "", *_group_lines(meta), "",
             "## Quality against the original", "", *_quality_lines(report, reproduce), ""]
    if commands or made:
        lines += ["## How it was made", "", *_made_lines(made), *(["```bash", *commands, "```", ""] if commands else [])]
    lines += ["## Load it", "", "```python", "import aecompress, transformers" if fmt == "compact" else "import transformers",
              load, "```", "", "## License", "",
              f"The original's license applies: `{license_name or 'see the original model'}` ({original})."
              " This card is written by aecompress; the original's card describes the uncompressed model.", ""]
    return "\n".join(lines)


def write(directory: Path, meta: dict, source: str, info: dict | None) -> None:
    """Write the card into an export directory (called inside its atomic write)."""
    info = info or {}
    text = render(meta, original_license(source), info.get("recipe"), info.get("commands", []), info.get("report"),
                  info.get("directory_name", Path(directory).name), info.get("made"))
    (Path(directory) / CARD).write_text(text)
