"""The LightningModule that trains one autoencoder per weight group."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from aecompress.autoencoder import AESpec, DecoderKind, EncoderKind, GroupAutoencoder, OutActivation, solve_spec
from aecompress.errors import AECompressError
from aecompress.groups import WeightGroup
from aecompress.metrics import ReconstructionError, row_loss
from aecompress.stored import StoredForm

log = logging.getLogger(__name__)


class CompressorModule(L.LightningModule):
    """Autoencoders over stacked weight rows, sized to a stored-size budget.

    Args:
        groups: weight groups with their budgets; linked from ``data.group_specs``.
        encoder: ``mlp`` or ``linear`` encoder, or ``free`` latents trained directly.
        decoder: ``mlp`` or ``linear`` decoder.
        encoder_widths: encoder hidden widths, as multiples of the solved scale.
        decoder_widths: decoder hidden widths, as multiples of the solved scale.
        latent_width: latent size as a multiple of the solved scale.
        out_activation: ``tanh`` (the seed) or ``none`` on the decoder output.
        enforce_norm: rescale each decoded row to its stored original norm (one number per row).
        cos_weight: weight of the cosine distance in the loss.
        rmse_weight: weight of the RMSE in the loss.
        optimizer: optimizer factory, set from the config.
        lr_scheduler: optional scheduler factory, set from the config.
    """

    def __init__(
        self,
        groups: list[dict] | None = None,
        encoder: EncoderKind = "mlp",
        decoder: DecoderKind = "mlp",
        encoder_widths: tuple[float, ...] = (8.0, 4.0),
        decoder_widths: tuple[float, ...] = (2.0, 4.0),
        latent_width: float = 1.0,
        out_activation: OutActivation = "tanh",
        enforce_norm: bool = True,
        cos_weight: float = 10 / 11,
        rmse_weight: float = 1 / 11,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__()
        if not groups:
            raise AECompressError("model.groups is empty: link it from the data module (data.group_specs)")
        if latent_width <= 0 or any(w <= 0 for w in (*encoder_widths, *decoder_widths)):
            raise AECompressError("latent_width and all layer widths must be positive")
        if cos_weight < 0 or rmse_weight < 0 or cos_weight + rmse_weight == 0:
            raise AECompressError("cos_weight and rmse_weight must be non-negative and not both zero")
        self.groups = [WeightGroup.from_dict(g) for g in groups]
        self.budgets = {g["name"]: int(g["budget"]) for g in groups}
        self.target_ratio = float(groups[0].get("ratio", 0.0))
        options = dict(
            encoder=encoder,
            decoder=decoder,
            encoder_widths=tuple(encoder_widths),
            decoder_widths=tuple(decoder_widths),
            latent_width=latent_width,
            out_activation=out_activation,
            enforce_norm=enforce_norm,
        )
        self.specs: dict[str, AESpec] = {
            g.name: solve_spec(g.name, g.rows, g.width, self.budgets[g.name], self.target_ratio, **options)
            for g in self.groups
        }
        self.aes = nn.ModuleDict({_key(g.name): GroupAutoencoder(self.specs[g.name], g.rows) for g in self.groups})
        self.val_metrics = nn.ModuleList([ReconstructionError() for _ in self.groups])
        self.val_total = ReconstructionError()
        self.cos_weight, self.rmse_weight = cos_weight, rmse_weight
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self._log_sizes()

    def _log_sizes(self) -> None:
        for g in self.groups:
            spec = self.specs[g.name]
            stored = spec.stored_numbers(g.rows)
            log.info(
                "group %s: latent %d, decoder %s, stored %d numbers (budget %d), ratio %.3f (target %.3f)",
                g.name, spec.latent, spec.decoder_sizes(), stored, self.budgets[g.name],
                g.rows * g.width / stored, self.target_ratio,
            )

    def autoencoder(self, name: str) -> GroupAutoencoder:
        """The autoencoder of a group, by group name."""
        return self.aes[_key(name)]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Sum the loss of every group's batch; stop loudly on a non-finite loss."""
        total = 0.0
        for name, (index, rows, norms, weights) in batch.items():
            recon = self.autoencoder(name)(rows, index, norms)
            loss = row_loss(recon, rows, weights, self.cos_weight, self.rmse_weight)
            if not torch.isfinite(loss):
                raise AECompressError(
                    f"non-finite loss ({loss.item()}) in group {name!r} at step {self.global_step}; "
                    "lower the learning rate or use 32-true precision (the last good checkpoint is kept)"
                )
            self.log(f"train/{name}/loss", loss, on_step=False, on_epoch=True)
            total = total + loss
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=True)
        return total

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accumulate reconstruction error of one group's rows."""
        index, rows, norms, _ = batch
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
            ae = self.autoencoder(g.name).cpu().float()
            tensors = ae.stored_tensors(rows[g.name])
            meta = {"spec": self.specs[g.name].to_dict(), "target_ratio": self.target_ratio}
            forms[g.name] = StoredForm("ae", g, tensors, meta)
        return forms


def load_weights(module: CompressorModule, ckpt_path: str) -> None:
    """Load a Lightning checkpoint's weights safely (no unpickling of arbitrary objects)."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise AECompressError(f"checkpoint {ckpt_path!r} does not exist") from err
    except Exception as err:
        raise AECompressError(f"cannot read checkpoint {ckpt_path!r} safely: {str(err).splitlines()[0]}") from err
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if state is None:
        raise AECompressError(f"checkpoint {ckpt_path!r} has no state_dict; is it a Lightning checkpoint?")
    own = module.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems = mismatched + [f"missing {k}" for k in sorted(set(own) - set(state))]
    problems += [f"unexpected {k}" for k in sorted(set(state) - set(own))]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AECompressError(f"checkpoint {ckpt_path!r} does not fit this config and model: {problems[0]}{more}")
    module.load_state_dict(state)


def _key(name: str) -> str:
    # ModuleDict keys cannot contain dots; group names like "key.3" can.
    return name.replace(".", "__")
