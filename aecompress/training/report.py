"""How good the fit is, said when it ends: the compressed model against the original and the closed-form methods.

:class:`FitReport` measures, on held-out text nothing was selected on, the best checkpoint's
model next to the original and next to the ``reported`` methods (SVD, whitened SVD and our best
closed-form quantizer, untuned, with its defaults) at the same budget (counted by the same
accountant), prints a short table with the command that compresses the whole model at that budget,
and saves it as ``report.json`` in the run directory. ``aecompress export`` puts it in the export's
model card when it belongs to the checkpoint exported.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

import aecompress.methods as methods
from aecompress.core.budget import Budget, bits_per_weight
from aecompress.core.errors import AECompressError
from aecompress.core.files import sha256
from aecompress.core.progress import progress
from aecompress.data.specs import parse_spec
from aecompress.data.tokens import token_ids
from aecompress.evaluation.catalog import HIGHER_IS_BETTER
from aecompress.evaluation.metrics import evaluate_model, targets_for
from aecompress.evaluation.models import load_tokenizer
from aecompress.evaluation.sentences import fidelity_reference
from aecompress.formats.sources import model_kind, public_name
from aecompress.formats.substitute import decode_all, substituted
from aecompress.training.checkpoints import load_weights
from aecompress.training.rundir import run_directory

log = logging.getLogger(__name__)

REPORT = "report.json"
METRICS = {"encoder": ["embedding_fidelity"], "causal_lm": ["kl_to_original", "top1_agreement", "perplexity"],
           "masked_lm": ["mlm_perplexity"]}
"""What the report measures per model kind; the first ranks (for causal LMs, fidelity to the original)."""


class FitReport(Callback):
    """At the end of ``fit``: the best checkpoint against the original and the factorizations, on held-out text.

    Args:
        data: the text measured on; a held-out split (``wiki:test``) that nothing was selected on.
        max_tokens: use only the first this many tokens of ``data``.
        baselines: closed-form methods measured beside it at the same budget; default: the methods whose row is
            ``reported`` (whitened methods need ``data.calibration``; without it they are left out, with a note).
        window: tokens per sequence for perplexities (default: the metric's own).
    """

    def __init__(self, data: str = "wiki:test", max_tokens: int | None = 8192,
                 baselines: list[str] | None = None, window: int | None = None):
        parse_spec(data)
        self.data, self.max_tokens, self.window = data, max_tokens, window
        self.baselines = [n for n, m in methods.METHODS.items() if m.reported] if baselines is None else list(baselines)
        for name in self.baselines:
            if methods.get(name).trained:
                raise AECompressError(f"FitReport baseline {name!r} is trained; valid: {', '.join(methods.compressors())}")
        self.report: dict | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure, print the table and save ``report.json`` (rank 0 only)."""
        if not trainer.is_global_zero or trainer.interrupted:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        if best:
            load_weights(pl_module, best)
        self.report = self._measure(trainer, pl_module, best)
        print(table(self.report), flush=True)
        path = run_directory(trainer) / REPORT
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{REPORT}.tmp")
        tmp.write_text(json.dumps(self.report, indent=2) + "\n")
        tmp.replace(path)

    @torch.no_grad()
    def _measure(self, trainer: L.Trainer, pl_module, best: str) -> dict:
        datamodule = trainer.datamodule
        model = datamodule.hf_model
        kind = model_kind(model)
        metrics = METRICS[kind]
        tokenizer = load_tokenizer(datamodule.source)
        ids = None if kind == "encoder" else token_ids(self.data, tokenizer)
        ids = ids[: self.max_tokens] if ids is not None and self.max_tokens else ids
        reference = (fidelity_reference(model, tokenizer, self.data, self.max_tokens) if kind == "encoder"
                     else targets_for(model, ids, self.window) if kind == "causal_lm" else None)
        candidates = {"aecompress (this fit)": list(pl_module.stored_forms(datamodule.rows).values())}
        notes = []
        for name in self.baselines:
            try:
                shown = f"{name} (untuned)" if methods.get(name).tunable else name  # as fit shows it, not as compress
                candidates[shown] = self._baseline(datamodule, name, pl_module.budgets)
            except AECompressError as err:
                notes.append(f"{name}: {err}")
        rows = [{"name": "original", "bits_per_weight": None, **self._score(model, tokenizer, metrics, reference, ids)}]
        for name, forms in progress(candidates.items(), "report", "model"):
            original = sum(f.group.rows * f.group.width for f in forms)
            stored = sum(f.bytes for f in forms)
            with substituted(model, decode_all(forms), originals=datamodule.rows):
                scores = self._score(model, tokenizer, metrics, reference, ids)
            rows.append({"name": name, "bits_per_weight": bits_per_weight(stored, original), "stored_bytes": stored,
                         "ratio": 4 * original / stored, **scores})
        counted = f"first {self.max_tokens} tokens" if self.max_tokens else "all of it"
        return {"split": self.data, "metric": metrics[0], "metrics": metrics, "tokens_or_items": counted,
                "direction": "; ".join(f"{m}: {'higher' if HIGHER_IS_BETTER[m] else 'lower'} is better" for m in metrics),
                "model": public_name(datamodule.model_name), "target_ratio": pl_module.target.ratio,
                "target_bits": float(pl_module.target.bits),
                "checkpoint": Path(best).name if best else None,
                "checkpoint_sha256": sha256(Path(best)) if best else None,
                "needs_reference": kind == "encoder", "rows": rows, "notes": notes}

    def _baseline(self, datamodule, name: str, budgets: dict[str, Budget]) -> list:
        method = methods.get(name)
        stats = {}
        for kind in method.needs:
            if datamodule.calibration_spec is None:
                raise AECompressError("needs calibration text (data.calibration)")
            stats = datamodule.calibration().stats(datamodule.groups, kind)
        return [methods.compress(name, g, datamodule.rows[g.name], budgets[g.name], stats.get(g.name), **method.defaults)
                for g in datamodule.groups]

    def _score(self, model, tokenizer, metrics: list[str], reference, ids) -> dict[str, float]:
        results = evaluate_model(model, tokenizer, self.data, metrics, reference=reference, max_tokens=self.max_tokens,
                                 window=self.window, ids=ids)
        return {m: float(results[m]) for m in metrics}


def table(report: dict) -> str:
    """The report as a short text table."""
    metrics = report.get("metrics", [report["metric"]])
    lines = [f"quality on {report['split']} ({report['tokens_or_items']}; {report['direction']}):",
             f"  {'model':<24} {'bits/weight':>11} " + " ".join(f"{m:>18}" for m in metrics)]
    for row in report["rows"]:
        bpw = "-" if row["bits_per_weight"] is None else f"{row['bits_per_weight']:.3f}"
        lines.append(f"  {row['name']:<24} {bpw:>11} " + " ".join(f"{row[m]:>18.6g}" for m in metrics))
    lines += [f"  (not measured: {note})" for note in report.get("notes", [])]
    if "target_bits" in report:  # reports written before it was recorded have no budget in bits
        lines.append(f"  the whole model (every attention and MLP weight) at this budget, no training, tuned: "
                     f"aecompress compress --model {report['model']} --bits {report['target_bits']:.4g} --out_dir DIR")
    return "\n".join(lines)


def card_info(ckpt_path: str, out_dir: str, fmt: str, configs: list[str]) -> dict:
    """What an export's model card says beyond the sidecar: recipe, commands, and the fit's report if it is this checkpoint's."""
    shown = [c if not Path(c).is_absolute() else Path(c).name for c in configs]
    flags = " ".join(f"--config {c}" for c in shown)
    commands = [f"aecompress fit {flags}",
                f"aecompress export {flags} --ckpt_path {Path(ckpt_path).name} --out_dir {Path(out_dir).name} --format {fmt}"]
    report_path = Path(ckpt_path).parent / REPORT
    report = None
    if report_path.is_file():
        try:
            found = json.loads(report_path.read_text())
            report = found if found.get("checkpoint_sha256") == sha256(Path(ckpt_path)) else None
        except (OSError, ValueError):
            report = None
    return {"recipe": ", ".join(shown) or None, "commands": commands if configs else [], "report": report}
