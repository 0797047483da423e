"""``aecompress benchmark``: every method at the same stored budget, side by side.

The model is loaded once. Each job (group x ratio x method) produces stored forms through
the one method table, is decoded into the model, evaluated on the report split, and
restored. Trained methods run their recipe with Lightning and select their checkpoint on
the validation split only; nothing is chosen on the split that is reported.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

from tqdm.auto import tqdm
from transformers import AutoTokenizer

import aecompress.methods as catalogue
from aecompress.benchmark.choices import GroupChoice, MethodChoice
from aecompress.benchmark.recipe import train_recipe
from aecompress.benchmark.report import markdown, plot
from aecompress.benchmark.results import ResultsCSV, Row
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup, extract_rows
from aecompress.core.selection import select_groups
from aecompress.core.stored import StoredForm
from aecompress.data.calibration import Calibration
from aecompress.data.specs import parse_spec
from aecompress.evaluation.metrics import evaluate_model
from aecompress.formats.sources import load_model, model_kind
from aecompress.methods.base import GroupStats
from aecompress.methods.substitute import decode_all, substituted

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
        # Embedding fidelity compares against the untouched original; encoders are small.
        self.reference = copy.deepcopy(self.model) if model_kind(self.model) == "encoder" else None

    def evaluate(self) -> dict[str, float]:
        """The model's current quality on the report split."""
        return evaluate_model(self.model, self.tokenizer, self.data, self.metrics, reference=self.reference,
                              max_tokens=self.max_tokens)

    def compressed(self, choice: MethodChoice, groups: list[WeightGroup], ratio: float) -> list[StoredForm]:
        """Stored forms of a closed-form method, with the calibration statistics it needs."""
        stats: dict[str, GroupStats] = {}
        for kind in catalogue.get(choice.method).needs:
            self.model.requires_grad_(True)  # Fisher needs weight gradients; an AE run may have frozen them
            stats = self.calibration.stats(groups, kind)
        return [
            catalogue.compress(choice.method, g, extract_rows(self.model, g), ratio, stats.get(g.name), **choice.options)
            for g in groups
        ]

    def trained(self, choice: MethodChoice, group: GroupChoice, mode: str, ratio: float,
                run_dir: Path) -> list[StoredForm]:
        """Train a recipe with Lightning; its checkpoint is selected on validation."""
        if not choice.recipe:
            raise AECompressError(
                f"method {choice.label!r} ({choice.method}) is trained: it needs a recipe, a fit config such as "
                "configs/best.yaml"
            )
        forms = train_recipe(choice.recipe, self, group.modules, mode, ratio, run_dir, choice.overrides)
        self.model.requires_grad_(True)
        return forms


def _rows(bench: Benchmark, group: str, method: str, ratio, forms, scores, seconds) -> list[Row]:
    original = sum(f.group.rows * f.group.width for f in forms)
    stored_numbers = sum(f.numbers for f in forms)
    stored_bytes = sum(f.bytes for f in forms)
    achieved = 4 * original / stored_bytes
    return [
        Row(bench.name, group, method, ratio, achieved, stored_numbers, stored_bytes, bench.data, metric, value, seconds)
        for metric, value in scores.items()
    ]


def _failed(bench: Benchmark, group: str, method: str, ratio, reason: str) -> Row:
    return Row(bench.name, group, method, ratio, "", "", "", bench.data, "failed", math.nan, "", reason)


def benchmark(
    model: str,
    groups: list[GroupChoice],
    methods: list[MethodChoice],
    ratios: list[float],
    out_dir: str = "bench",
    data: str = "wiki:test",
    calibration: str = "calibration",
    calibration_tokens: int = 8192,
    calibration_window: int = 512,
    metrics: list[str] | None = None,
    max_tokens: int | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Run methods x ratios x groups on one model and write results.csv, results.md and a plot.

    Rows already in ``out_dir/results.csv`` are skipped, so an interrupted run
    resumes where it stopped. A ratio a method cannot reach is recorded as a
    failed row with its reason, and the run goes on.

    Args:
        model: a local directory, hub id or packaged name (``smollm2-135m``, ``minilm-l6``).
        groups: the weight groups to compress, each benchmarked on its own.
        methods: the methods to compare (baselines and autoencoder recipes).
        ratios: target compression ratios (original float32 bytes / stored bytes).
        out_dir: where results.csv, results.md, quality_vs_ratio.png and AE runs go.
        data: the split reported in the results (never used for any choice).
        calibration: text for data-aware methods (covariances, Fisher rows).
        calibration_tokens: at most this many calibration tokens.
        calibration_window: tokens per calibration window.
        metrics: metric names; default: those that fit the model (see ``aecompress evaluate``).
        max_tokens: cap on evaluation tokens.
        trust_remote_code: allow model code from the checkpoint.
    """
    if not groups or not methods or not ratios:
        raise AECompressError("benchmark needs at least one group, one method and one ratio")
    for choice in methods:
        catalogue.get(choice.method)  # an unknown name is refused before anything loads
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
    jobs = [(g, r, m) for g in groups for r in ratios for m in methods]
    for group, ratio, choice in tqdm(jobs, desc="benchmark", unit="job"):
        if results.done(model, group.label, choice.label, ratio):
            continue
        _run_job(bench, results, group, ratio, choice, out)
    (out / "results.md").write_text(markdown(results.rows, data))
    png = plot(results.rows, data, out / "quality_vs_ratio.png")
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}" + (f", {png}" if png else ""))


def _run_job(bench: Benchmark, results: ResultsCSV, group: GroupChoice, ratio: float, choice: MethodChoice,
             out: Path) -> None:
    mode = choice.mode or group.mode
    start = time.perf_counter()
    try:
        selected = select_groups(bench.model, group.modules, mode)
        if catalogue.get(choice.method).trained:
            run_dir = out / "runs" / f"{group.label}-{choice.label}-r{ratio:g}".replace("/", "_")
            forms = bench.trained(choice, group, mode, ratio, run_dir)
        else:
            forms = bench.compressed(choice, selected, ratio)
    except AECompressError as err:
        log.warning("%s / %s / ratio %g failed: %s", group.label, choice.label, ratio, err)
        results.add([_failed(bench, group.label, choice.label, ratio, str(err))])
        return
    seconds = time.perf_counter() - start
    with substituted(bench.model, decode_all(forms)):
        scores = bench.evaluate()
    results.add(_rows(bench, group.label, choice.label, ratio, forms, scores, seconds))
    log.info("%s / %s / ratio %g: %s (%.1fs)", group.label, choice.label, ratio, scores, seconds)
