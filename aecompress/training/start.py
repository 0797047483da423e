"""Where training starts: a factorization of each group, and whether refinement columns join it.

A mixin of :class:`~aecompress.training.module.CompressorModule`. Before fitting, each group
starts exactly at a factorization (plain or whitened SVD, its codes balanced before rounding),
so a run selected on validation can never end worse than that start; with
``refine_codes: auto`` the refined start replaces the plain one only where the model measures
significantly better with it.
"""

from __future__ import annotations

import logging

import torch

from aecompress.blocks.autoencoder_nets import AESpec
from aecompress.blocks.factorize import Factorization, whitening
from aecompress.blocks.lowbit import balance
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.evaluation.paired import paired_z
from aecompress.training.callbacks import ModelQualityCallback
from aecompress.training.sizing import group_key

log = logging.getLogger(__name__)


class StartSelection:
    """The compressor module's ``setup``: calibration factors, ``auto`` widths, the factorization start."""

    def setup(self, stage: str) -> None:
        """Before fitting: attach calibration factors, choose ``auto`` code widths, start from a factorization."""
        if stage != "fit":
            return
        datamodule = self.trainer.datamodule
        quality = self._quality_callback() if self.refine_choice else None
        if self.loss_kind == "output":
            datamodule.hf_model.requires_grad_(False)
        needs_cov = self.loss_kind == "whitened" or self.init_kind == "whitened_svd"
        covariances = datamodule.calibration_covariances() if needs_cov else {}
        tokens = datamodule.calibration_token_count() if needs_cov else 0
        facts = {}  # kept only while refine_codes: auto still has to choose
        for g in self.groups:
            if self.loss_kind == "whitened":
                factors = torch.stack([whitening(c, self.damp, tokens, g.name)[0].float() for c in covariances[g.name]])
                self.register_buffer(f"whiten__{group_key(g.name)}", factors, persistent=False)
            fact = None
            if self.latent_auto or self.init_kind != "random":
                fact = self.factorization(g.name, datamodule.rows[g.name], covariances.get(g.name), tokens)
            if self.latent_auto:
                self.resolve_codes(g, fact)
            if self.init_kind != "random":
                self.initialize(g.name, datamodule.rows[g.name], fact=fact)
            if quality is not None:
                facts[g.name] = fact
        for g in self.groups if quality is not None else []:  # every group started: each choice sees the others'
            self.choose_refinement(g, facts[g.name], datamodule.rows[g.name], quality)

    def _quality_callback(self) -> ModelQualityCallback:
        """``refine_codes: auto``: the ``ModelQualityCallback`` whose data and significance decide."""
        found = [cb for cb in self.trainer.callbacks if isinstance(cb, ModelQualityCallback)]
        if not found or found[0].significance is None:
            raise AECompressError(
                "model.refine_codes 'auto' keeps refinement columns only where the model measures significantly "
                "better with them, so it needs a ModelQualityCallback with significance set (e.g. significance: 2.0); "
                "or set model.refine_codes to true or false"
            )
        return found[0]

    def choose_refinement(self, group: WeightGroup, fact: Factorization, rows: torch.Tensor,
                          quality: ModelQualityCallback) -> None:
        """``refine_codes: auto``: keep the refined start only if it measures significantly better.

        The plain factorization start (codes up to full rank, its own best width under
        ``latent_storage: auto``) is the default; the refined start replaces it only if
        it beats it by ``quality.significance`` standard errors of the paired per-item
        difference on the callback's data. Rank 0 measures; every rank adopts its choice.
        """
        refined = self.specs[group.name]
        if refined.latent <= min(group.rows, group.width):
            return  # no columns past full rank: nothing to choose
        width = self.choose_codes(group, fact, refine=False) if self.latent_auto else refined.latent_storage
        plain = self._solve(group, width, refine=False)
        z = None
        # Rebuilding an autoencoder draws from the global generator; the data order must not
        # depend on how the choice went, so a kept refined start trains as refine_codes: true does.
        with torch.random.fork_rng(devices=[]):
            if self.trainer.is_global_zero:
                scores = {name: self._start_scores(group, spec, fact, rows, quality)
                          for name, spec in (("plain", plain), ("refined", refined))}
                metric = next(iter(scores["plain"]))
                z = paired_z(metric, scores["refined"][metric], scores["plain"][metric])
            z = self.trainer.strategy.broadcast(z, src=0)
        keep = z >= quality.significance
        log.info("group %s: refinement columns %s: the refined start is %.2f standard errors better (needs %g)",
                 group.name, "kept" if keep else "dropped", z, quality.significance)
        with torch.random.fork_rng(devices=[]):
            self._adopt(group, refined if keep else plain)
        self.initialize(group.name, rows, fact=fact)

    def _start_scores(
        self, group: WeightGroup, spec: AESpec, fact: Factorization, rows: torch.Tensor, quality: ModelQualityCallback
    ) -> dict[str, torch.Tensor]:
        """The callback's per-item scores of the model with this group started at ``spec``."""
        self._adopt(group, spec)
        self.initialize(group.name, rows, fact=fact)
        items: dict[str, torch.Tensor] = {}
        quality.measure(self.trainer, self, items)
        if not items:
            raise AECompressError(
                "model.refine_codes 'auto' compares per-item scores, but the ModelQualityCallback measures none of "
                f"perplexity or embedding_fidelity (metrics: {quality.metrics}); add one, or set refine_codes true or false"
            )
        return items

    def factorization(
        self, name: str, rows: torch.Tensor, covariances: torch.Tensor | None = None, tokens: int = 0
    ) -> Factorization:
        """The factorization a group starts from: plain SVD, or whitened by its members' mean covariance."""
        chol = None
        if self.init_kind == "whitened_svd":
            chol = whitening(covariances.double().mean(0), self.damp, tokens, name)[0]
        return Factorization(rows.double(), None, chol)

    @torch.no_grad()
    def initialize(
        self, name: str, rows: torch.Tensor, covariances: torch.Tensor | None = None, tokens: int = 0,
        fact: Factorization | None = None,
    ) -> None:
        """Set free latents and the linear decoder to a rank-``latent`` factorization of ``rows``.

        Integer latents start from the balanced codes (:func:`aecompress.blocks.lowbit.balance`)
        that a factorization baseline of this rank and width stores; the autoencoder's
        own rank can be a little lower, since its decoder bias is stored too. Latent
        columns past the full rank start as refinement codes (:func:`aecompress.blocks.lowbit.refine`).
        With a residual decoder the non-linear branch starts at zero, so the decoded rows
        equal the factorization exactly at step 0.
        """
        ae = self.autoencoder(name)
        fact = fact or self.factorization(name, rows, covariances, tokens)
        rank = min(ae.spec.latent, len(fact.s))
        a, b = fact.factors(rank, torch.float32)
        if ae.spec.latent_bits is not None:
            balanced = self.latent_layout == "balanced"
            a, b, _, _ = balance(a, b, ae.spec.latent_bits, None, balanced, ae.spec.latent - rank)
        linear = ae.decoder.linear if ae.spec.decoder == "residual" else ae.decoder[0]
        ae.latents.copy_(a)
        linear.weight.copy_(b.T)
        linear.bias.zero_()
