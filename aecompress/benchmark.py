"""``aecompress benchmark``: every method at the same stored budget, side by side.

The model is loaded once. Each job (group x ratio x method) produces stored
forms through the one interface, is decoded into the model, evaluated on the
report split, and restored. Autoencoder recipes are trained with Lightning
and select their checkpoint on the validation split only; nothing is chosen
on the split that is reported.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from aecompress.errors import AECompressError
from aecompress.groups import WeightGroup, assign_rows, extract_rows, select_groups
from aecompress.loading import load_model
from aecompress.results import ResultsCSV, Row, markdown, plot
from aecompress.stored import StoredForm, decode

log = logging.getLogger(__name__)


@dataclass
class GroupChoice:
    """Which weights one benchmark group compresses.

    Attributes:
        name: the group's name in the results (defaults to the modules joined by ``+``).
        modules: module types or patterns, as in ``data.modules``.
        mode: ``concatenated`` (one stacked group per module type) or ``separated``.
    """

    modules: list[str]
    name: str | None = None
    mode: str = "concatenated"

    @property
    def label(self) -> str:
        """The name shown in results."""
        return self.name or "+".join(self.modules)


@dataclass
class MethodChoice:
    """One method to run, with its options.

    Attributes:
        method: ``svd``, ``fwsvd``, ``whitened_svd``, ``prune``, ``quantize``, or ``ae``.
        name: the method's name in the results (defaults to ``method``).
        options: the baseline's keyword options (see ``aecompress.baselines.options``).
        mode: override the group's mode (e.g. ``separated`` for per-layer SVD).
        recipe: for ``ae``: a fit config (YAML) whose ``model``, ``trainer`` and ``data``
            training settings are used; the model, modules, mode and ratio come from the benchmark.
        overrides: for ``ae``: dotted keys replacing recipe values, e.g.
            ``{"model.storage_dtype": "float16", "trainer.max_steps": 100}``.
    """

    method: str
    name: str | None = None
    options: dict = field(default_factory=dict)
    mode: str | None = None
    recipe: str | None = None
    overrides: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The name shown in results."""
        return self.name or self.method


def _apply(model: nn.Module, forms: list[StoredForm]) -> dict[str, torch.Tensor]:
    """Decode forms into the model; return the original rows for restoring."""
    originals = {f.group.name: extract_rows(model, f.group) for f in forms}
    for form in forms:
        assign_rows(model, form.group, decode(form))
    return originals


def _restore(model: nn.Module, forms: list[StoredForm], originals: dict[str, torch.Tensor]) -> None:
    for form in forms:
        assign_rows(model, form.group, originals[form.group.name])


class Benchmark:
    """State shared by the jobs of one benchmark run: the model, tokenizer, statistics."""

    def __init__(self, model: str, data: str, calibration: str, calibration_tokens: int, calibration_window: int,
                 metrics: list[str] | None, max_tokens: int | None, trust_remote_code: bool):
        from transformers import AutoTokenizer

        from aecompress.evaluate import model_kind

        self.name, self.data, self.metrics, self.max_tokens = model, data, metrics, max_tokens
        self.calibration, self.calibration_tokens, self.calibration_window = (
            calibration, calibration_tokens, calibration_window)
        self.model, self.source, self.auto_class = load_model(model, trust_remote_code=trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(self.source)
        # Embedding fidelity compares against the untouched original; encoders are small.
        self.reference = copy.deepcopy(self.model) if model_kind(self.model) == "encoder" else None
        self._windows: torch.Tensor | None = None
        self._stats: dict[tuple[str, str], dict] = {}

    def evaluate(self) -> dict[str, float]:
        """The model's current quality on the report split."""
        from aecompress.evaluate import evaluate_model

        return evaluate_model(self.model, self.tokenizer, self.data, self.metrics, reference=self.reference,
                              max_tokens=self.max_tokens)

    def windows(self) -> torch.Tensor:
        """Calibration windows, tokenized once."""
        if self._windows is None:
            from aecompress.text import token_ids, windows

            ids = token_ids(self.calibration, self.tokenizer)[: self.calibration_tokens]
            self._windows = windows(ids, self.calibration_window, self.calibration_window)
        return self._windows

    def stats(self, groups: list[WeightGroup], kind: str) -> dict:
        """Calibration statistics of these groups (cached in memory and on disk)."""
        from aecompress.calibration import collect

        missing = [g for g in groups if (g.name, kind) not in self._stats]
        if missing:
            self.model.requires_grad_(True)  # Fisher needs weight gradients; an AE run may have frozen them
            found = collect(self.model, missing, self.windows(), what=(kind,), cache_key=self.source)
            for g in missing:
                self._stats[(g.name, kind)] = found[g.name]
        return {g.name: self._stats[(g.name, kind)] for g in groups}

    def baseline(self, choice: MethodChoice, groups: list[WeightGroup], ratio: float) -> list[StoredForm]:
        """Stored forms of a factorization, pruning or quantization baseline."""
        from aecompress.baselines import NEEDS, compress

        kind = NEEDS.get(choice.method)
        stats = self.stats(groups, kind) if kind else {}
        return [
            compress(choice.method, g, extract_rows(self.model, g), ratio, stats.get(g.name), **choice.options)
            for g in groups
        ]

    def autoencoder(self, choice: MethodChoice, group: GroupChoice, mode: str, ratio: float,
                    run_dir: Path) -> list[StoredForm]:
        """Train an autoencoder recipe with Lightning; select its checkpoint on validation."""
        from aecompress.recipe import train_recipe

        if not choice.recipe:
            raise AECompressError(f"method {choice.label!r} (ae) needs a recipe: a fit config such as configs/best.yaml")
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
    from tqdm.auto import tqdm

    from aecompress.text import parse_spec

    if not groups or not methods or not ratios:
        raise AECompressError("benchmark needs at least one group, one method and one ratio")
    known = {"svd", "fwsvd", "whitened_svd", "prune", "quantize", "ae"}
    for choice in methods:
        if choice.method not in known:
            raise AECompressError(f"unknown method {choice.method!r}; valid: {', '.join(sorted(known))}")
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
        if choice.method == "ae":
            run_dir = out / "runs" / f"{group.label}-{choice.label}-r{ratio:g}".replace("/", "_")
            forms = bench.autoencoder(choice, group, mode, ratio, run_dir)
        else:
            forms = bench.baseline(choice, selected, ratio)
    except AECompressError as err:
        log.warning("%s / %s / ratio %g failed: %s", group.label, choice.label, ratio, err)
        results.add([_failed(bench, group.label, choice.label, ratio, str(err))])
        return
    seconds = time.perf_counter() - start
    originals = _apply(bench.model, forms)
    try:
        scores = bench.evaluate()
    finally:
        _restore(bench.model, forms, originals)
    results.add(_rows(bench, group.label, choice.label, ratio, forms, scores, seconds))
    log.info("%s / %s / ratio %g: %s (%.1fs)", group.label, choice.label, ratio, scores, seconds)
