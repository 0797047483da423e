"""The LightningModule that trains a trained method's codec per weight group: the autoencoder, or any other.

``model.method`` names a trained method of the table (:mod:`aecompress.methods`). The autoencoder
(``ae``, the default) is sized and started here (:mod:`.sizing`, :mod:`.start`); any other trained
method builds its own codec from its row's ``build`` trait, and everything else (the losses, the
model-level objective, validation, checkpoints, stored forms) is the same for both.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

import aecompress.methods as catalogue
from aecompress.blocks.autoencoder_nets import (
    AESpec,
    DecoderKind,
    EncoderKind,
    GroupAutoencoder,
    LatentStorage,
    OutActivation,
    StorageDtype,
)
from aecompress.blocks.factorize import DEFAULT_DAMP
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup, substituted_params
from aecompress.core.stored import StoredForm
from aecompress.training import checkpoints
from aecompress.training.checkpoints import SIGNATURE
from aecompress.training.losses import row_loss, whitened_loss
from aecompress.training.reconstruction import ReconstructionError
from aecompress.training.sizing import SpecSizing, group_budget, group_key
from aecompress.training.start import StartSelection
from aecompress.training.teacher import Teacher

log = logging.getLogger(__name__)

InitKind = Literal["random", "svd", "whitened_svd"]
LossKind = Literal["cos_rmse", "whitened", "output"]


class CompressorModule(SpecSizing, StartSelection, L.LightningModule):
    """Codecs over stacked weight rows, sized to a stored-size budget: autoencoders, or another trained method's.

    Args:
        groups: weight groups with their budgets; linked from ``data.group_specs``.
        method: the trained method to train (a name from ``aecompress.methods.METHODS``); default the autoencoder.
            The options below from ``encoder`` to ``refine_codes`` shape the autoencoder only.
        options: options of another trained method's codec (its row's ``build``); empty for the autoencoder.
        encoder: ``mlp`` or ``linear`` encoder, or ``free`` latents trained directly.
        decoder: ``mlp``, ``linear``, or ``residual`` (linear plus a small zero-initialized
            non-linear branch) decoder.
        encoder_widths: encoder hidden widths, as multiples of the solved scale.
        decoder_widths: decoder hidden widths, as multiples of the solved scale.
        latent_width: latent size as a multiple of the solved scale.
        out_activation: ``tanh`` (the seed) or ``none`` on the decoder output.
        enforce_norm: rescale each decoded row to its stored original norm (one number per row).
        cos_weight: weight of the cosine distance in the ``cos_rmse`` loss.
        rmse_weight: weight of the RMSE in the ``cos_rmse`` loss.
        init: ``random``, or start exactly at a factorization: ``svd`` or ``whitened_svd``
            (the latter with the group's mean calibration covariance). Needs free
            latents, a linear or residual decoder, and no output activation.
        loss: ``cos_rmse`` (the seed: cosine distance + RMSE per row) or ``whitened``:
            ||(W' - W) L_m|| with each layer's calibration covariance L_m L_mᵀ,
            relative to ||W L_m||; needs ``data.calibration``. ``output``: the
            model-level objective — make the compressed model's outputs on calibration
            windows match the original's (rest of the model frozen): KL divergence of
            next-token distributions for LM heads, relative squared error of the last
            hidden states for encoders without a head.
        residual_hidden: hidden width of the ``residual`` decoder's non-linear branch.
        damp: covariance damping, as a fraction of its mean diagonal.
        cache_teacher: with the ``output`` loss, keep the original model's outputs for each
            calibration window (on the CPU) instead of recomputing them every epoch.
        teacher_top_k: with the ``output`` loss on an LM, the next-token targets kept per position: the
            top ``k`` log-probabilities and the tail's mass (see :mod:`aecompress.training.teacher`), so
            the memory held does not grow with the vocabulary; null keeps whole float16 logits.
        storage_dtype: the dtype latents, decoder and norms are stored in. Half precision
            buys twice the numbers for the same bytes (so a larger latent size); training runs
            in float32 and the stored values are rounded once, at export.
        latent_storage: ``dtype`` keeps latents in ``storage_dtype``; ``int3`` .. ``int8`` store
            each latent row as integer codes of that many bits with one float16 scale, so the
            budget buys a larger latent size. ``auto`` picks, per group when fitting starts, the
            width whose starting factorization leaves the least truncation plus rounding error
            (the rule of the baselines' ``codes: auto``, at the autoencoder's own sizes; needs a
            linear or residual decoder); checkpoints record the width chosen. Training sees the
            rounding (straight-through), so the latents validated are the latents stored.
        latent_layout: with integer latents and a factorization start, ``balanced`` rescales
            the starting codes' columns (and the decoder's inputs) so that rounding spreads
            evenly (see :mod:`aecompress.blocks.lowbit`); ``plain`` starts from the codes as factored.
        refine_codes: with integer latents, a linear or residual decoder and a factorization
            start, let the latent grow past the factorization's full rank where the budget
            allows (low ratios): each extra latent column starts as the rounding residual of a
            leading column, stored finer (see :func:`aecompress.blocks.lowbit.refine`). A factorization
            cannot use that budget; its rank stops at the matrix's smaller side. ``auto``: keep
            them only where the model measures better with them, before the first step, by at
            least the ``ModelQualityCallback``'s ``significance`` standard errors of the paired
            per-item difference on its validation data; elsewhere start from the plain
            factorization. Weight-space error always favours them, but on SmolLM2's q_proj at
            ratio 4 the refined start scored worse on test than the plain one (-2.2 standard errors).
        optimizer: optimizer factory, set from the config.
        lr_scheduler: optional scheduler factory, set from the config.
    """

    def __init__(
        self,
        groups: list[dict] | None = None,
        method: str = catalogue.AUTOENCODER,
        options: dict | None = None,
        encoder: EncoderKind = "mlp",
        decoder: DecoderKind = "mlp",
        encoder_widths: tuple[float, ...] = (8.0, 4.0),
        decoder_widths: tuple[float, ...] = (2.0, 4.0),
        latent_width: float = 1.0,
        out_activation: OutActivation = "tanh",
        enforce_norm: bool = True,
        cos_weight: float = 10 / 11,
        rmse_weight: float = 1 / 11,
        init: InitKind = "random",
        loss: LossKind = "cos_rmse",
        residual_hidden: int = 32,
        damp: float = DEFAULT_DAMP,
        storage_dtype: StorageDtype = "float32",
        latent_storage: LatentStorage | Literal["auto"] = "dtype",
        latent_layout: Literal["balanced", "plain"] = "balanced",
        refine_codes: bool | Literal["auto"] = True,
        cache_teacher: bool = True,
        teacher_top_k: int | None = 64,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        if not groups:
            raise AECompressError("model.groups is empty: link it from the data module (data.group_specs)")
        for key, value in (("latent_width", latent_width), ("encoder_widths", tuple(encoder_widths)),
                           ("decoder_widths", tuple(decoder_widths))):
            if any(not w > 0 for w in (value if isinstance(value, tuple) else (value,))):
                raise AECompressError(f"model.{key} must be positive, got {value}")
        if cos_weight < 0 or rmse_weight < 0 or cos_weight + rmse_weight == 0:
            raise AECompressError("cos_weight and rmse_weight must be non-negative and not both zero")
        if init != "random" and (encoder != "free" or decoder == "mlp" or out_activation != "none"):
            raise AECompressError(
                f"model.init {init!r} starts from a factorization, so it needs encoder: free, "
                f"decoder: linear or residual, and out_activation: none (got {encoder}, {decoder}, {out_activation})"
            )
        if latent_layout not in ("balanced", "plain"):
            raise AECompressError(f"model.latent_layout must be balanced or plain, got {latent_layout!r}")
        if latent_storage == "auto" and decoder == "mlp":
            raise AECompressError(
                "model.latent_storage 'auto' sizes latent codes by the factorization they start from, so it "
                "needs decoder: linear or residual (got mlp); name a width instead, e.g. int8"
            )
        self.init_kind, self.loss_kind, self.damp = init, loss, damp
        self.latent_auto, self.latent_layout = latent_storage == "auto", latent_layout
        if refine_codes not in (True, False, "auto"):
            raise AECompressError(f"model.refine_codes must be true, false or auto, got {refine_codes!r}")
        self.refine_codes = bool(refine_codes) and init != "random" and decoder in ("linear", "residual")
        self.refine_choice = self.refine_codes and refine_codes == "auto"
        self.latent_config = latent_storage
        try:
            self.teacher = Teacher(teacher_top_k, cache_teacher)
        except ValueError as err:
            raise AECompressError(f"model.teacher_top_k: {err}") from None
        self.groups = [WeightGroup.from_dict(g) for g in groups]
        self.target = group_budget(groups[0], "target")
        # Each group's own budget: the target, or what an allocation plan gave it.
        self.budgets = {g["name"]: group_budget(g) for g in groups}
        self.method, codec_options = method, options
        built = self._builder(method, options, init, latent_storage, refine_codes)
        options = dict(
            encoder=encoder,
            decoder=decoder,
            encoder_widths=tuple(encoder_widths),
            decoder_widths=tuple(decoder_widths),
            latent_width=latent_width,
            out_activation=out_activation,
            enforce_norm=enforce_norm,
            residual_hidden=residual_hidden,
            dtype=storage_dtype,
            latent_storage=latent_storage,
        )
        self._options = options
        self.specs: dict[str, AESpec] = {}
        if built is None:
            self.specs = {g.name: self._placeholder(g) if self.latent_auto else self._solve(g, latent_storage)
                          for g in self.groups}
        self.aes = nn.ModuleDict({group_key(g.name): built(g, self.budgets[g.name], **(codec_options or {}))
                                  if built is not None else GroupAutoencoder(self.specs[g.name], g.rows)
                                  for g in self.groups})
        self.val_metrics = nn.ModuleList([ReconstructionError() for _ in self.groups])
        self.val_total = ReconstructionError()
        self.cos_weight, self.rmse_weight = cos_weight, rmse_weight
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self._log_sizes()

    @staticmethod
    def _builder(method: str, options: dict | None, init: str, latent_storage: str, refine_codes) -> object:
        """The row's ``build`` for a trained method other than the autoencoder, checked; None for the autoencoder."""
        row = catalogue.get(method)
        if not row.trained:
            trained = [n for n, m in catalogue.METHODS.items() if m.trained and m.budgeted]
            raise AECompressError(f"model.method {method!r} is not a trained method; valid: {', '.join(trained)} "
                                  "(closed-form methods need no training: aecompress compress)")
        if row.build is None:
            if options:
                raise AECompressError(f"model.options {options!r}: the autoencoder takes its options as model.* "
                                      "(model.encoder, model.decoder...), not model.options")
            return None
        unknown = row.unknown(options or {})
        if unknown:
            raise AECompressError(f"unknown option {unknown[0]!r} for method {method!r}; valid: "
                                  f"{', '.join(row.options()) or '(none)'}")
        if init != "random" or latent_storage == "auto" or refine_codes == "auto":
            raise AECompressError(f"model.init, latent_storage auto and refine_codes auto start the autoencoder "
                                  f"from a factorization; method {method!r} builds its own codec")
        return row.build

    def autoencoder(self, name: str) -> nn.Module:
        """The codec of a group (its autoencoder, or the trained method's codec), by group name."""
        return self.aes[group_key(name)]

    def on_fit_start(self) -> None:
        """The frozen model follows the compressor to its device (for the ``output`` loss)."""
        if self.loss_kind == "output":
            self.trainer.datamodule.hf_model.to(self.device)

    def decoded_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """All rows of a group decoded, differentiably (free latents or encoder)."""
        index = torch.arange(rows.shape[0], device=rows.device)
        return self.autoencoder(name)(rows, index, rows.norm(dim=1))

    def _output_step(self, batch) -> torch.Tensor:
        datamodule = self.trainer.datamodule
        model = datamodule.hf_model
        ids = batch[0] if isinstance(batch, (list, tuple)) else batch
        decoded = {g: self.decoded_rows(g.name, datamodule.rows[g.name].to(self.device)) for g in self.groups}
        targets = self.teacher.targets(model, ids)
        student = torch.func.functional_call(model, substituted_params(model, decoded), (), {"input_ids": ids})
        loss = self.teacher.mismatch(student, targets)
        self._check_finite(loss, "+".join(g.name for g in self.groups))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def _check_finite(self, loss: torch.Tensor, name: str) -> None:
        if not torch.isfinite(loss):
            raise AECompressError(
                f"non-finite loss ({loss.item()}) in group {name!r} at step {self.global_step}; "
                "lower the learning rate or use 32-true precision (the last good checkpoint is kept)"
            )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Sum the loss of every group's batch; stop loudly on a non-finite loss."""
        if self.loss_kind == "output":
            return self._output_step(batch)
        total = 0.0
        for name, (index, rows, norms, weights, members) in batch.items():
            recon = self.autoencoder(name)(rows, index, norms)
            if self.loss_kind == "whitened":
                loss = whitened_loss(recon, rows, members, getattr(self, f"whiten__{group_key(name)}"))
            else:
                loss = row_loss(recon, rows, weights, self.cos_weight, self.rmse_weight)
            self._check_finite(loss, name)
            self.log(f"train/{name}/loss", loss, on_step=False, on_epoch=True)
            total = total + loss
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=True)
        return total

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate reconstruction error of one group's rows."""
        index, rows, norms, _, _ = batch
        recon = self.autoencoder(self.groups[dataloader_idx].name)(rows, index, norms)
        self.val_metrics[dataloader_idx].update(recon, rows)
        self.val_total.update(recon, rows)

    def on_validation_epoch_end(self) -> None:
        """Log per-group and pooled metrics (``val/rel_fro``, ``val/cos_dist``)."""
        for group, metric in zip(self.groups, self.val_metrics):
            for key, value in metric.compute().items():
                self.log(f"val/{group.name}/{key}", value, add_dataloader_idx=False)
            metric.reset()
        for key, value in self.val_total.compute().items():
            self.log(f"val/{key}", value, prog_bar=True, add_dataloader_idx=False)
        self.val_total.reset()

    def signature(self) -> dict:
        """What a checkpoint must agree on to be resumed or exported by this config."""
        # Written as ratios, as every checkpoint has recorded them, so older checkpoints still match.
        ratios = {name: b.ratio for name, b in self.budgets.items()}
        planned = any(b != self.target for b in self.budgets.values())
        return {
            **({"method": self.method} if self.method != catalogue.AUTOENCODER else {}),
            "target_ratio": self.target.ratio,
            **({"ratios": ratios} if planned else {}),
            "loss": self.loss_kind,
            "init": self.init_kind,
            "groups": {g.name: g.to_dict() for g in self.groups},
            "specs": {name: spec.to_dict() for name, spec in self.specs.items()},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the signature, so a resume with another config is refused by name."""
        checkpoint[SIGNATURE] = self.signature()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse (``--ckpt_path``) a checkpoint written by another config, naming the first difference."""
        path = getattr(self.trainer, "ckpt_path", None) if self._trainer is not None else None
        checkpoints.accept(self, checkpoint, path)

    def configure_optimizers(self):
        """Optimizer and optional scheduler from the injected factories."""
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def stored_forms(self, rows: dict[str, torch.Tensor]) -> dict[str, StoredForm]:
        """The stored form of every group, given the groups' original rows."""
        forms = {}
        for g in self.groups:
            # A CPU float32 copy: decoding must be exactly reproducible, and the
            # module in training must stay on its own device and precision.
            ae = copy.deepcopy(self.autoencoder(g.name)).cpu().float()
            tensors = ae.stored_tensors(rows[g.name])
            spec = {"spec": self.specs[g.name].to_dict()} if g.name in self.specs else {}
            meta = {**spec, "target_ratio": self.budgets[g.name].ratio}
            forms[g.name] = StoredForm(self.method, g, tensors, meta)
        return forms
