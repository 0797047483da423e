"""A whole-model fine-tune of grouped codes' scales against the original model's outputs.

Closed-form codes (``quantize``, ``compensated``) are chosen one matrix at a time, each against its
own inputs. What the model finally computes depends on all of them at once. Here every group's
scales are fine-tuned together so that the compressed model's outputs on calibration windows match
the original's (next-token KL against bounded top-k targets for LMs, see
:mod:`aecompress.training.teacher`), the codes and zero codes kept as they are. The decoded
weight of a run of columns is linear in its scale (``scale * (code - zero_code)``, or
``zero + scale * code`` with a float zero scaled alike), so a learned factor per run folds
exactly into the stored scale: the form's tensors and bytes stay the same, only their values change.
Every other group stays in the student as decoded, so each run's factor sees the whole model's errors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader

import aecompress.methods as catalogue
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup, substituted_params
from aecompress.core.stored import StoredForm
from aecompress.methods import decode
from aecompress.training.progress import ProgressLines
from aecompress.training.teacher import Teacher

log = logging.getLogger(__name__)

def tunable(form: StoredForm) -> bool:
    """Whether a form's decoded rows are its stored scales times fixed codes (so its scales can be tuned)."""
    return catalogue.get(form.method).tunable and "scale" in form.tensors


def _runs(form: StoredForm) -> int:
    scale = form.tensors["scale"]
    return int(scale.shape[1]) if scale.dim() == 2 else 1


class ScaleTuning(L.LightningModule):
    """One learned log-factor per stored scale of every tunable form; the rest of the model frozen.

    Args:
        model: the original model (the teacher; never written to).
        forms: the stored forms of every compressed group.
        lr: Adam's learning rate on the log-factors.
        top_k: next-token targets kept per position (see :class:`~aecompress.training.teacher.Teacher`).
    """

    def __init__(self, model: nn.Module, forms: list[StoredForm], lr: float = 1e-3, top_k: int | None = 64):
        super().__init__()
        self.model = model
        self.forms, self.lr = list(forms), lr
        self.teacher = Teacher(top_k)
        self.logs = nn.ParameterList()
        for i, form in enumerate(self.forms):
            if tunable(form):
                rows, log_factor = factors(form)
                self.logs.append(nn.Parameter(log_factor))
            else:
                rows = decode(form).float()
            self.register_buffer(f"base{i}", rows, persistent=False)

    def decoded(self) -> dict[WeightGroup, torch.Tensor]:
        """Every group's rows with the current factors applied, differentiably."""
        out, learned = {}, iter(self.logs)
        for i, form in enumerate(self.forms):
            base = getattr(self, f"base{i}")
            out[form.group] = scaled(form, base, next(learned)) if tunable(form) else base
        return out

    def on_train_epoch_start(self) -> None:
        """The frozen model runs as at inference (no dropout), for the teacher and the student alike."""
        self.model.eval()

    def _objective(self, batch) -> tuple[torch.Tensor, int]:
        """KL (or hidden-state error) of the compressed model against the original on one window batch, and its size."""
        ids = batch[0] if isinstance(batch, (list, tuple)) else batch
        targets = self.teacher.targets(self.model, ids)
        student = torch.func.functional_call(self.model, substituted_params(self.model, self.decoded()), (),
                                             {"input_ids": ids})
        return self.teacher.mismatch(student, targets), ids.shape[0]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """The tune's objective on one window batch, the loss the factors descend."""
        loss, _ = self._objective(batch)
        # Every rank decides together: a rank that stopped alone would leave the others waiting in the all-reduce.
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            # the forms were finite before the first step (see tune), so the steps did it
            raise AECompressError(f"tune loss became non-finite at step {self.global_step} (lr {self.lr}); "
                                  "lower the tune's learning rate (--tune_lr; tune.lr in a benchmark)")
        self.log("tune/loss", loss, prog_bar=True, on_step=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        """The tune's objective on one window batch, averaged over every window (see :func:`tune`)."""
        loss, size = self._objective(batch)
        self.log("tune/objective", loss, on_epoch=True, batch_size=size, sync_dist=True)  # over every rank's windows

    def configure_optimizers(self):
        """Adam on the log-factors only."""
        return torch.optim.Adam(self.logs.parameters(), lr=self.lr)

    @torch.no_grad()
    def stored(self) -> list[StoredForm]:
        """The forms with each learned factor folded into its stored scale (and float zero): same tensors, same bytes."""
        learned = iter(self.logs)
        return [folded(f, next(learned), self.global_step) if tunable(f) else f for f in self.forms]


@torch.no_grad()
def factors(form: StoredForm) -> tuple[torch.Tensor, torch.Tensor]:
    """A tunable form's decoded rows as (rows x runs x columns per run), and a zero log-factor per run to learn."""
    runs = _runs(form)
    rows = decode(form).float().view(form.group.rows, runs, form.group.width // runs)
    return rows, torch.zeros(form.group.rows, runs)


def scaled(form: StoredForm, base: torch.Tensor, log_factor: torch.Tensor) -> torch.Tensor:
    """The rows with each run's learned factor applied, differentiably (``base`` from :func:`factors`)."""
    return (base * log_factor.exp().unsqueeze(-1)).reshape(form.group.rows, form.group.width)


@torch.no_grad()
def folded(form: StoredForm, log_factor: torch.Tensor, steps: int) -> StoredForm:
    """The form with a learned factor per run folded into its stored scale (and float zero): same tensors, same bytes."""
    factor = log_factor.detach().float().cpu().exp()
    tensors = dict(form.tensors)
    for key in ("scale", "zero"):
        if key in tensors:
            value = tensors[key]
            tensors[key] = (value.float() * factor.view(value.shape)).to(value.dtype).contiguous()
    return dataclasses.replace(form, tensors=tensors, meta={**form.meta, "tuned_steps": steps})


OPTIONS = {"steps": int, "lr": float, "top_k": int, "batch_size": int, "precision": str, "accelerator": str,
           "devices": int, "strategy": str, "num_nodes": int, "timeout": int}
"""What a tuning may be given, and of which type (a benchmark method's ``tune``, ``compress``'s ``--tune_*``)."""


NULLABLE = ("top_k", "timeout")
"""Options that may be null: all next-token targets kept, Lightning's own process-group timeout."""


PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
CHOICES = {"precision": PRECISIONS, "accelerator": ("auto", "cpu", "gpu", "cuda", "mps"), "strategy": ("auto", "ddp")}
"""The values a tuning's Trainer settings may take (Lightning's own names). Not ``fsdp``: the tune calls the model
functionally with its own parameter names and folds factors into unsharded scales; not ``ddp_spawn``: the spawned
processes' step count does not come back to the main one."""


def _valid(key: str, value) -> bool:
    kind = OPTIONS[key]
    if key in CHOICES:
        return value in CHOICES[key]
    if key in NULLABLE and value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        return False
    return value >= 0 if key == "steps" else value > 0


def checked_options(options: dict) -> dict:
    """``options`` if every key is a tuning option with a valid value; otherwise one clear error naming it."""
    for key, value in options.items():
        if key not in OPTIONS:
            raise AECompressError(f"tune option {key!r} is not one of: {', '.join(OPTIONS)}")
        if not _valid(key, value):
            wanted = ("one of " + ", ".join(CHOICES[key]) if key in CHOICES
                      else "an integer, 0 or more" if key == "steps"
                      else "a positive integer or null" if key in NULLABLE
                      else f"a positive {OPTIONS[key].__name__}")
            raise AECompressError(f"tune {key} {value!r} is not valid; it must be {wanted}")
    return dict(options)


def tune(model: nn.Module, forms: list[StoredForm], windows: torch.Tensor, steps: int, lr: float = 1e-3,
         top_k: int | None = 64, batch_size: int = 1, precision: str = "32-true", seed: int = 0,
         accelerator: str = "auto", devices: int = 1, strategy: str = "auto", num_nodes: int = 1,
         timeout: int | None = None) -> list[StoredForm]:
    """The forms with their scales fine-tuned for ``steps`` steps on calibration ``windows`` against ``model``.

    ``accelerator``, ``devices``, ``strategy`` and ``num_nodes`` go to Lightning's Trainer as ``fit``'s do: with
    ``strategy: ddp`` Lightning's own launcher starts the other processes (each runs the command again up to
    here), every rank holds the model and tunes on its share of the windows (``batch_size`` per rank), the
    factors' gradients are averaged, and the objective is reduced over every window. Every rank returns the
    same forms; the caller writes them from rank 0 only. ``timeout`` (seconds) is how long the processes wait for
    one another (DDP's process-group timeout; None: Lightning's 30 minutes).

    The tune's objective is measured on every window before and after: a tune that made it worse (too
    high a learning rate) returns the untuned forms, with a warning, so nothing exported is worse than
    not tuning. Each tuned form's ``meta["tune"]`` records both values and whether the tune was kept.
    The model's own weights and its ``requires_grad`` flags are left as they were.
    """
    if steps <= 0 or not any(tunable(f) for f in forms):
        return list(forms)
    flags, training = {n: p.requires_grad for n, p in model.named_parameters()}, model.training
    model.requires_grad_(False)
    module = ScaleTuning(model, forms, lr, top_k)
    loader = DataLoader(windows, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    every = DataLoader(windows, batch_size=batch_size)
    # max_epochs=-1: the steps decide (under DDP each rank's epoch is shorter).
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator=accelerator, devices=devices,
                        strategy=trainer_strategy(strategy, timeout),
                        num_nodes=num_nodes, precision=precision, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        enable_progress_bar=False, callbacks=[ProgressLines("tune", "tune/loss")],  # a log shows it too
                        inference_mode=False)  # the teacher's targets kept while measuring are used again in training
    try:
        with warnings.catch_warnings():  # the frozen model is in eval mode on purpose (see on_train_epoch_start)
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            warnings.filterwarnings("ignore", message=r"You defined a `validation_step` but have no")  # see _objective
            before = _objective(trainer, module, every)
            trainer.fit(module, loader)
            after = _objective(trainer, module, every)
    finally:
        module.cpu()
        model.train(training)
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
    log.info("tuned %d groups' scales for %d steps (objective %.4g -> %.4g); teacher targets held %.1f MB",
             len(module.logs), steps, before, after, module.teacher.nbytes / 2**20)
    record = {"kept": after <= before, "steps": steps, "lr": lr, "objective_before": before, "objective_after": after}
    if after <= before:
        return [recorded(f, record) for f in module.stored()]
    log.warning("the tune made its objective worse on the calibration windows (%.4g untuned, %.4g after %d steps at "
                "lr %g); kept the untuned forms: lower the tune's learning rate", before, after, steps, lr)
    return [recorded(f, record) for f in forms]


def trainer_strategy(strategy: str, timeout: int | None) -> str | DDPStrategy:
    """Lightning's strategy by name, or DDP with a process-group timeout: the processes Lightning's launcher starts
    redo the loading, calibration and compression before the tune while rank 0 waits, which can outlast the default
    30 minutes on a big model."""
    return DDPStrategy(timeout=timedelta(seconds=timeout)) if strategy == "ddp" and timeout else strategy


def _objective(trainer: L.Trainer, module: ScaleTuning, every: DataLoader) -> float:
    """The tune's loss over every calibration window with the current factors (fit itself validates nothing).

    A non-finite loss before any step means the forms were broken before the tune, whatever its learning rate.
    """
    value = float(trainer.validate(module, every, verbose=False)[0]["tune/objective"])
    if not math.isfinite(value) and module.global_step == 0:
        raise AECompressError("the compressed model's outputs are not finite before tuning; the method's options "
                              "give a broken form (check --options)")
    return value


def recorded(form: StoredForm, record: dict, key: str = "tune") -> StoredForm:
    """The form with a tune's outcome in its meta under ``key`` (only forms whose scales a tune could change)."""
    return dataclasses.replace(form, meta={**form.meta, key: dict(record)}) if tunable(form) else form


def spread(tune: dict) -> tuple[str, int] | None:
    """The first of ``devices``/``num_nodes`` asking a tune for more than one process, or None: for callers that
    tune in this process only (a benchmark, block by block)."""
    return next(((k, tune[k]) for k in ("devices", "num_nodes") if tune.get(k, 1) != 1), None)
