"""Model-level validation during ``fit``: the decoded weights, substituted into the model, measured.

Reconstruction error says how close the rows are; :class:`ModelQualityCallback` says how the
model behaves with them. Its ``val/<metric>`` values can be monitored by ``ModelCheckpoint``
and ``EarlyStopping`` like any other logged value.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from aecompress.core.errors import AECompressError
from aecompress.data.specs import parse_spec
from aecompress.data.tokens import token_ids
from aecompress.evaluation.catalog import CAUSAL_METRICS, FIDELITY_METRICS, METRICS
from aecompress.evaluation.metrics import check_metrics, default_metrics, evaluate_model, targets_for
from aecompress.evaluation.models import load_tokenizer
from aecompress.evaluation.paired import paired_z
from aecompress.evaluation.sentences import fidelity_reference
from aecompress.formats.substitute import decode_all, substituted

log = logging.getLogger(__name__)

GUARDED = "_significant"
"""Suffix of the values that move only on a significant gain over the start (see ``significance``)."""


class ModelQualityCallback(Callback):
    """Evaluate the model with the current decoded weights every ``every_n_epochs`` epochs.

    The data module's model is changed in place for the measurement and restored from the
    original rows afterwards, so export and later epochs see the original weights. Only
    rank 0 measures; the values are broadcast so every rank logs the same numbers.

    Args:
        data: a validation or calibration data spec (see :mod:`aecompress.data.specs`). A test
            split is refused: nothing may be selected on it.
        metrics: metric names (see ``aecompress.evaluation.catalog.METRICS``); ``None`` picks those
            that fit the model, with embedding fidelity against the original for encoders.
        every_n_epochs: measure after every this many epochs (match ``ModelCheckpoint``'s
            ``every_n_epochs`` if it monitors one of these values).
        max_tokens: use only the first this many tokens of ``data``, to keep epochs cheap.
        window: tokens per sequence (default 512 for perplexity, 128 for masked LM).
        batch_size: sequences per forward pass.
        at_start: also measure the starting point before the first step, and offer it to
            every ``ModelCheckpoint`` that monitors one of these values, as the step-0
            checkpoint. ``None`` (default): only when the compressor starts from a
            factorization (``model.init`` other than ``random``), so a run selected on
            validation can never end worse than the factorization it started from.
        significance: if set (needs the start measured), also log ``val/<metric>_significant``
            for ``perplexity`` and ``embedding_fidelity``: the measured value where it beats the
            start's by at least this many standard errors of their paired per-item difference,
            the start's value elsewhere (and the z-score as ``val/<metric>_z``). Monitor it
            instead of ``val/<metric>`` so that only a gain the validation slice can resolve
            replaces the start. ``model.refine_codes: auto`` decides by the same threshold
            whether refinement columns replace the plain factorization start.
    """

    def __init__(
        self,
        data: str = "wiki:validation",
        metrics: list[str] | None = None,
        every_n_epochs: int = 1,
        max_tokens: int | None = None,
        window: int | None = None,
        batch_size: int = 4,
        at_start: bool | None = None,
        significance: float | None = None,
    ):
        spec = parse_spec(data)
        if spec.is_test:
            raise AECompressError(
                f"ModelQualityCallback data {data!r} is a test split; select on a validation split "
                "(e.g. wiki:validation) and keep test for reporting"
            )
        if every_n_epochs < 1:
            raise AECompressError(f"every_n_epochs must be at least 1, got {every_n_epochs}")
        if significance is not None and not significance > 0:
            raise AECompressError(f"significance must be a positive number of standard errors (e.g. 2.0), got {significance}")
        if metrics is not None:
            unknown = [m for m in metrics if m not in METRICS]
            if unknown:
                raise AECompressError(f"unknown metric {unknown[0]!r}; valid: {', '.join(METRICS)}")
        self.data = data
        self.metrics = metrics
        self.every_n_epochs = every_n_epochs
        self.max_tokens = max_tokens
        self.window = window
        self.batch_size = batch_size
        self.at_start = at_start
        self.significance = significance
        self.start_seconds = 0.0  # time of the before-the-first-step measurement (FitTimer counts it as validation)
        self._tokenizer = None
        self._ids: torch.Tensor | None = None
        self._reference: torch.Tensor | None = None
        self._chosen: list[str] | None = None
        self._start: dict[str, float] = {}  # the start's values, and its per-item scores below, when guarding
        self._start_items: dict[str, torch.Tensor] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the data module carries a model, and load its tokenizer once."""
        datamodule = trainer.datamodule
        if datamodule is None or not all(hasattr(datamodule, a) for a in ("hf_model", "rows", "source")):
            raise AECompressError("ModelQualityCallback needs aecompress's WeightRowsDataModule (with hf_model and rows)")
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(datamodule.source)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse a ``ModelCheckpoint`` that would look for our values on epochs we skip.

        Lightning only notices after the first epoch that the monitored key is missing;
        saying so before any training costs the user nothing. Only ``fit`` checkpoints.
        """
        for checkpoint in trainer.checkpoint_callbacks:
            if not isinstance(checkpoint, ModelCheckpoint) or not checkpoint.monitor:
                continue
            name = checkpoint.monitor.removeprefix("val/")
            if name.endswith(GUARDED) and self.significance is None:
                raise AECompressError(
                    f"ModelCheckpoint monitors {checkpoint.monitor!r}, which ModelQualityCallback logs only with "
                    f"significance set (e.g. significance: 2.0); or monitor {checkpoint.monitor.removesuffix(GUARDED)!r}"
                )
            every = getattr(checkpoint, "_every_n_epochs", 1)
            if name.removesuffix(GUARDED) in METRICS and every and every % self.every_n_epochs:
                raise AECompressError(
                    f"ModelCheckpoint(monitor={checkpoint.monitor!r}) has every_n_epochs={every}, but "
                    f"ModelQualityCallback measures it every {self.every_n_epochs} epochs; give the checkpoint "
                    f"every_n_epochs={self.every_n_epochs} (or a multiple)"
                )

    def _prepare(self, model: torch.nn.Module) -> None:
        """Choose metrics, tokenize the data, and measure the original once (before any substitution).

        The original's embeddings (encoders) or next-token targets (causal LMs) are what every
        later measurement compares with, so fidelity is measured without a second copy of the model.
        """
        self._chosen = check_metrics(
            self.metrics if self.metrics is not None else default_metrics(model, self.data, has_reference=True),
            model, has_reference=True,
        )
        if any(m in (*CAUSAL_METRICS, "mlm_perplexity") for m in self._chosen):
            ids = token_ids(self.data, self._tokenizer)
            self._ids = ids[: self.max_tokens] if self.max_tokens else ids
        if "embedding_fidelity" in self._chosen:
            self._reference = fidelity_reference(model, self._tokenizer, self.data, self.max_tokens)
        if any(m in FIDELITY_METRICS for m in self._chosen):
            self._reference = targets_for(model, self._ids, self.window, None, self.batch_size)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Substitute, measure, restore, log ``val/<metric>`` (and the guarded values)."""
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        results = self._measure_guarded(trainer, pl_module) if trainer.is_global_zero else None
        results = trainer.strategy.broadcast(results, src=0)
        for name, value in results.items():
            pl_module.log(f"val/{name}", float(value), prog_bar=not name.endswith("_z"), add_dataloader_idx=False,
                          sync_dist=False)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure the starting point and let checkpointing keep it if nothing later beats it."""
        starts_from_factors = getattr(pl_module, "init_kind", "random") != "random"
        measure_start = starts_from_factors if self.at_start is None else self.at_start
        if self.significance is not None and not measure_start:
            raise AECompressError(
                "ModelQualityCallback significance compares trained steps with the start, but the start is not "
                "measured (model.init is random or at_start is false); set at_start: true or drop significance"
            )
        if trainer.global_step != 0 or not measure_start:
            return
        start = time.perf_counter()
        results = self._measure_start(trainer, pl_module) if trainer.is_global_zero else None
        results = trainer.strategy.broadcast(results, src=0)
        self.start_seconds = time.perf_counter() - start
        metrics = {f"val/{name}": torch.tensor(float(value)) for name, value in results.items()}
        log.info("before the first step: %s", ", ".join(f"{k}={float(v):.6g}" for k, v in metrics.items()))
        trainer.callback_metrics.update(metrics)
        if trainer.logger is not None:
            trainer.logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=0)
        for checkpoint in trainer.checkpoint_callbacks:
            if isinstance(checkpoint, ModelCheckpoint) and checkpoint.monitor in metrics:
                # ModelCheckpoint never saves before a step was taken; the step-0 candidate
                # goes through its own top-k bookkeeping, so a later epoch replaces it only if better.
                checkpoint._save_topk_checkpoint(trainer, {**checkpoint._monitor_candidates(trainer), **metrics})

    def _measure_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The start's values; when guarding, keep its per-item scores and log it as its own guarded value."""
        items: dict[str, torch.Tensor] = {}
        results = self.measure(trainer, pl_module, items if self.significance is not None else None)
        if self.significance is None:
            return results
        self._start, self._start_items = dict(results), items
        return {**results, **{f"{name}{GUARDED}": results[name] for name in items}}

    def _measure_guarded(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """This epoch's values, plus ``<metric>_significant`` and ``<metric>_z`` when guarding."""
        if self.significance is None:
            return self.measure(trainer, pl_module)
        if not self._start_items:
            raise AECompressError(
                "ModelQualityCallback significance has no start to compare with: the run was resumed from a "
                "checkpoint written before significance was set; start the run again"
            )
        items: dict[str, torch.Tensor] = {}
        results = self.measure(trainer, pl_module, items)
        extra: dict[str, float] = {}
        for name, scores in items.items():
            z = paired_z(name, scores, self._start_items[name])
            extra[f"{name}{GUARDED}"] = results[name] if z >= self.significance else self._start[name]
            extra[f"{name}_z"] = z
        return {**results, **extra}

    def state_dict(self) -> dict:
        """The start's values and per-item scores, so a resumed run still compares with its start."""
        return {"start": dict(self._start), "start_items": dict(self._start_items)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._start = dict(state_dict.get("start", {}))
        self._start_items = dict(state_dict.get("start_items", {}))

    @torch.no_grad()
    def measure(
        self, trainer: L.Trainer, pl_module: L.LightningModule, items: dict[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """The metrics of the data module's model with the current decoded weights (per-item scores into ``items``)."""
        datamodule = trainer.datamodule
        model = datamodule.hf_model
        model_device = next(model.parameters()).device
        if self._chosen is None:
            self._prepare(model)
        device, training = pl_module.device, pl_module.training
        forms = pl_module.stored_forms(datamodule.rows)
        pl_module.to(device)  # stored_forms reads the autoencoders on the CPU; training goes on where it was
        pl_module.train(training)
        try:
            with substituted(model, decode_all(forms.values()), originals=datamodule.rows):
                model.to(device)
                return evaluate_model(
                    model, self._tokenizer, self.data, self._chosen, reference=self._reference,
                    max_tokens=self.max_tokens, window=self.window, batch_size=self.batch_size, ids=self._ids,
                    items=items,
                )
        finally:
            model.to(model_device)
