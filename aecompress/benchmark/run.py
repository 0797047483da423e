"""``aecompress benchmark``: every method at the same stored budget, side by side.

The model is loaded once. Each job (group x ratio x method) produces stored forms through
the one method table, is decoded into the model, evaluated on the report split, and
restored. Trained methods run their recipe with Lightning and select their checkpoint on
the validation split only; nothing is chosen on the split that is reported.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

import aecompress.methods as catalogue
from aecompress.benchmark.recipe import train_recipe
from aecompress.benchmark.report import markdown, plot, whole_model_markdown
from aecompress.benchmark.results import ResultsCSV, Row
from aecompress.compress.choices import GroupChoice, MethodChoice
from aecompress.compress.pipeline import check_tune, closed_form
from aecompress.core.budget import BITS_PER_ORIGINAL, Budget, bits_per_weight, whole_model
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.memory import peak_rss, reset_peak
from aecompress.core.progress import progress
from aecompress.core.selection import select_groups
from aecompress.core.stored import StoredForm
from aecompress.data.calibration import Calibration
from aecompress.data.specs import parse_spec
from aecompress.data.tokens import token_ids
from aecompress.evaluation import allocation
from aecompress.evaluation.metrics import evaluate_model, targets_for
from aecompress.formats.sidecar import covered
from aecompress.formats.sources import load_model, model_kind
from aecompress.formats.substitute import decode_all, substituted

log = logging.getLogger(__name__)


class Benchmark:
    """State shared by the jobs of one benchmark run: the model, tokenizer, calibration statistics."""

    def __init__(self, model: str, data: str, calibration: str, calibration_tokens: int, calibration_window: int,
                 metrics: list[str] | None, max_tokens: int | None, trust_remote_code: bool):
        self.name, self.data, self.metrics, self.max_tokens = model, data, metrics, max_tokens
        self.model, self.source, self.auto_class = load_model(model, trust_remote_code=trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(self.source)
        self.calibration = Calibration(self.model, self.tokenizer, calibration, calibration_tokens, calibration_window,
                                       cache_key=self.source)
        self.plans: list[dict] = []
        self._damage = None
        self.ids = token_ids(data, self.tokenizer) if model_kind(self.model) == "causal_lm" else None
        if self.ids is not None and max_tokens:
            self.ids = self.ids[:max_tokens]
        # Fidelity compares with the untouched original, measured once: its sentence embeddings are
        # computed from a copy (encoders are small), a causal LM's next-token targets right here.
        self.reference = (copy.deepcopy(self.model) if model_kind(self.model) == "encoder"
                          else targets_for(self.model, self.ids) if self.ids is not None else None)

    def evaluate(self) -> dict[str, float]:
        """The model's current quality on the report split."""
        return evaluate_model(self.model, self.tokenizer, self.data, self.metrics, reference=self.reference,
                              max_tokens=self.max_tokens, ids=self.ids)

    def compressed(self, choice: MethodChoice, groups: list[WeightGroup], target: Budget) -> list[StoredForm]:
        """Stored forms of a closed-form method, with the calibration statistics it needs, allocated as it asks."""
        forms, chosen = closed_form(self.model, self.calibration, choice, groups, target, self.damage)
        if chosen is not None:
            self.plans.append({"method": choice.label, **chosen.to_dict()})
        return forms

    def damage(self):
        """How far the model's outputs are from the original's on calibration text (the allocator's measure)."""
        if self._damage is None:
            self._damage = allocation.damage_on(self.model, self.tokenizer, self.calibration.spec)
        return self._damage

    def trained(self, choice: MethodChoice, group: GroupChoice, mode: str, target: Budget,
                run_dir: Path) -> list[StoredForm]:
        """Train a recipe with Lightning; its checkpoint is selected on validation."""
        if not choice.recipe:
            raise AECompressError(
                f"method {choice.label!r} ({choice.method}) is trained: it needs a recipe, a fit config such as "
                "configs/best.yaml"
            )
        forms = train_recipe(choice.recipe, self, group.modules, mode, target, run_dir, choice.overrides)
        self.model.requires_grad_(True)
        return forms


def _rows(bench: Benchmark, group: str, method: str, target: Target, forms, scores, seconds, peak) -> list[Row]:
    """The measured rows of one job, its size counted by the accountant for the group and for the whole model."""
    original = sum(f.group.rows * f.group.width for f in forms)
    stored_numbers = sum(f.numbers for f in forms)
    stored_bytes = sum(f.bytes for f in forms)
    achieved = 4 * original / stored_bytes
    whole = whole_model(dict(bench.model.named_parameters()), covered(bench.model, {f.group.name: f for f in forms}),
                        stored_bytes)
    extra = dict(target_bits=target.bits if target.bits is not None else "",
                 bits_per_weight=bits_per_weight(stored_bytes, original),
                 whole_bits_per_weight=whole["bits_per_weight"], peak_rss_mb=peak)
    return [
        Row(bench.name, group, method, target.ratio_text, achieved, stored_numbers, stored_bytes, bench.data, metric,
            value, seconds, **extra)
        for metric, value in scores.items()
    ]


def _failed(bench: Benchmark, group: str, method: str, target: Target, reason: str) -> Row:
    return Row(bench.name, group, method, target.ratio_text, "", "", "", bench.data, "failed", math.nan, "", reason,
               target_bits=target.bits if target.bits is not None else "")


@dataclass(frozen=True)
class Target:
    """One budget of a benchmark: a ratio, or bits per weight (``ratio = 32 / bits``); None: the method's own size."""

    ratio: float | None
    bits: float | None = None

    @property
    def budget(self) -> Budget | None:
        """The budget, from the unit it was written in; None: the method's own size."""
        if self.ratio is None:
            return None
        return Budget.of_bits(self.bits) if self.bits is not None else Budget.of_ratio(self.ratio)

    @property
    def ratio_text(self) -> float | str:
        return "-" if self.ratio is None else self.ratio

    @property
    def label(self) -> str:
        return "own size" if self.ratio is None else f"{self.bits:g} bits" if self.bits is not None else f"ratio {self.ratio:g}"


def _targets(ratios: list[float] | None, bits: list[float] | None) -> list[Target]:
    if bool(ratios) == bool(bits):
        raise AECompressError("benchmark needs ratios or bits (bits per weight budgets), one of the two")
    if bits:
        return [Target(BITS_PER_ORIGINAL / b, b) for b in bits]
    return [Target(r) for r in ratios]


def benchmark(
    model: str,
    groups: list[GroupChoice],
    methods: list[MethodChoice],
    ratios: list[float] | None = None,
    bits: list[float] | None = None,
    out_dir: str = "bench",
    data: str = "wiki:test",
    calibration: str = "calibration",
    calibration_tokens: int = 8192,
    calibration_window: int = 512,
    metrics: list[str] | None = None,
    max_tokens: int | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Run methods x budgets x groups on one model and write results.csv, results.md and a plot.

    Rows already in ``out_dir/results.csv`` are skipped, so an interrupted run
    resumes where it stopped. A budget a method cannot reach is recorded as a
    failed row with its reason, and the run goes on. Every row records its size in bits per
    weight (compressed groups and whole model, counted by the one accountant), its seconds and
    the process's peak memory during the job.

    Args:
        model: a local directory, hub id or packaged name (``smollm2-135m``, ``minilm-l6``).
        groups: the weight groups to compress, each benchmarked on its own.
        methods: the methods to compare (baselines and autoencoder recipes).
        ratios: target compression ratios (original float32 bytes / stored bytes) of every group.
        bits: budgets in bits per weight instead (``ratio = 32 / bits``); give ratios or bits.
        out_dir: where results.csv, results.md, quality_vs_ratio.png and AE runs go.
        data: the split reported in the results (never used for any choice).
        calibration: text for data-aware methods (covariances, Fisher rows).
        calibration_tokens: at most this many calibration tokens.
        calibration_window: tokens per calibration window.
        metrics: metric names; default: those that fit the model (see ``aecompress evaluate``).
        max_tokens: cap on evaluation tokens.
        trust_remote_code: allow model code from the checkpoint.
    """
    targets = _targets(ratios, bits)
    if not groups or not methods:
        raise AECompressError("benchmark needs at least one group and one method")
    for choice in methods:
        catalogue.get(choice.method)  # an unknown name or tune option is refused before anything loads
        check_tune(choice)
    if parse_spec(calibration).is_test:
        raise AECompressError(f"calibration data {calibration!r} is a test split; calibrate on other text")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = ResultsCSV(out / "results.csv")
    bench = Benchmark(model, data, calibration, calibration_tokens, calibration_window, metrics, max_tokens,
                      trust_remote_code)
    if not results.done(model, "(all)", "original", "-"):
        start = time.perf_counter()
        scores = bench.evaluate()
        results.add([Row(model, "(all)", "original", "-", 1.0, "", "", data, k, v, time.perf_counter() - start)
                     for k, v in scores.items()])
    jobs = [(g, t, m) for g in groups for m in methods
            for t in (targets if catalogue.get(m.method).budgeted else [Target(None)])]
    for group, target, choice in progress(jobs, "benchmark", "job"):
        if results.done(model, group.label, choice.label, target.ratio_text, target.bits or ""):
            continue
        _run_job(bench, results, group, target, choice, out)
    if bench.plans:  # appended to the plans of earlier (resumed) runs
        earlier = json.loads((out / "plans.json").read_text()) if (out / "plans.json").is_file() else []
        (out / "plans.json").write_text(json.dumps(earlier + bench.plans, indent=1) + "\n")
    trained = frozenset(c.label for c in methods if catalogue.get(c.method).trained)
    if bits:
        (out / "results.md").write_text(whole_model_markdown(results.rows, data))
        png = plot(results.rows, data, out / "quality_vs_bits.png", against="bits", trained=trained)
    else:
        (out / "results.md").write_text(markdown(results.rows, data))
        png = plot(results.rows, data, out / "quality_vs_ratio.png", trained=trained)
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}" + (f", {png}" if png else ""))


def _run_job(bench: Benchmark, results: ResultsCSV, group: GroupChoice, target: Target, choice: MethodChoice,
             out: Path) -> None:
    mode = choice.mode or group.mode
    reset_peak()
    start = time.perf_counter()
    try:
        selected = select_groups(bench.model, group.modules, mode)
        if catalogue.get(choice.method).trained:
            run_dir = out / "runs" / f"{group.label}-{choice.label}-{target.label}".replace("/", "_").replace(" ", "")
            forms = bench.trained(choice, group, mode, target.budget, run_dir)
        else:
            forms = bench.compressed(choice, selected, target.budget)
    except AECompressError as err:
        log.warning("%s / %s / %s failed: %s", group.label, choice.label, target.label, err)
        results.add([_failed(bench, group.label, choice.label, target, str(err))])
        return
    seconds = time.perf_counter() - start
    with substituted(bench.model, decode_all(forms)):
        scores = bench.evaluate()
    peak = peak_rss() / 2**20
    results.add(_rows(bench, group.label, choice.label, target, forms, scores, seconds, peak))
    log.info("%s / %s / %s: %s (%.1fs, peak %.0f MiB)", group.label, choice.label, target.label, scores, seconds, peak)
