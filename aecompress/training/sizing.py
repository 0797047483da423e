"""How big each group's autoencoder may be: specs solved from the byte budget, and ``auto`` code widths.

A mixin of :class:`~aecompress.training.module.CompressorModule`: the module holds the
config (``_options``, ``budgets``, ``target``) and the built autoencoders; this
decides their specs, rebuilds a group when a width is chosen, and adopts the choices a
checkpoint recorded.
"""

from __future__ import annotations

import logging

from aecompress.blocks.autoencoder_nets import AESpec, GroupAutoencoder, solve_spec, spec_for_scale
from aecompress.blocks.factorize import Factorization
from aecompress.blocks.lowbit import pick_bits
from aecompress.core.budget import Budget, original_bytes
from aecompress.core.codes import BITS
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.training.checkpoints import SIGNATURE

log = logging.getLogger(__name__)


def group_budget(group: dict, which: str = "") -> Budget:
    """A group's budget from the data module's group entry (``bits``), or the ``target`` (``target_bits``).

    Entries are how the data module hands groups to the module, and they live on in checkpoints'
    hyperparameters: entries written before budgets were bits carry ``ratio`` and ``target_ratio``.
    """
    key = f"{which}_bits" if which else "bits"
    if key in group:
        return Budget.parse(group[key])
    legacy = f"{which}_ratio" if which else "ratio"
    return Budget.of_ratio(float(group.get(legacy, group.get("ratio", 0.0))))


def group_key(name: str) -> str:
    """A group's key in a ``ModuleDict``: keys cannot contain dots, and group names like ``key.3`` can."""
    return name.replace(".", "__")


class SpecSizing:
    """Spec solving and ``latent_storage: auto`` for the compressor module."""

    def _solve(self, group: WeightGroup, latent_storage: str, refine: bool | None = None) -> AESpec:
        """The largest spec of this config that fits the group's budget with that latent storage.

        With refinement codes (``refine``, by default the config's) an integer latent may grow
        to twice the group's full rank.
        """
        options = {**self._options, "latent_storage": latent_storage}
        wider = (self.refine_codes if refine is None else refine) and latent_storage.startswith("int")
        return solve_spec(group.name, group.rows, group.width, self.budgets[group.name],
                          max_scale=2 * min(group.rows, group.width) if wider else None, **options)

    def _fitting_widths(self, group: WeightGroup, refine: bool | None = None) -> dict[int, AESpec]:
        """For ``latent_storage: auto``: each code width that fits the group's budget, with its spec."""
        specs = {}
        for bits in sorted(BITS, reverse=True):
            try:
                specs[bits] = self._solve(group, f"int{bits}", refine)
            except AECompressError:
                continue  # this width does not fit at all
        if not specs:  # raise the infeasible-ratio error of the width that is cheapest at its smallest size
            def smallest(bits: int) -> int:
                options = {**self._options, "latent_storage": f"int{bits}"}
                return spec_for_scale(1, group.width, **options).stored_bytes(group.rows)

            self._solve(group, f"int{min(BITS, key=smallest)}")
        return specs

    def _placeholder(self, group: WeightGroup) -> AESpec:
        """``latent_storage: auto`` before fitting resolves it: the widest code that fits."""
        return next(iter(self._fitting_widths(group).values()))

    def _log_sizes(self, groups: list[WeightGroup] | None = None) -> None:
        for g in groups or [g for g in self.groups if g.name in self.specs]:  # the autoencoder's sizes
            spec = self.specs[g.name]
            stored = spec.stored_bytes(g.rows)
            codes = "" if spec.latent_bits is None else f" (latents {spec.latent_storage})"
            log.info(
                "group %s: latent %d, decoder %s, stored %d bytes in %s (budget %d), ratio %.3f (target %.3f)",
                g.name, spec.latent, spec.decoder_sizes(), stored, spec.dtype + codes,
                self.budgets[g.name].bytes(g.rows, g.width), original_bytes(g.rows, g.width) / stored,
                self.budgets[g.name].ratio,
            )

    def _adopt(self, group: WeightGroup, spec: AESpec) -> None:
        """Rebuild a group's autoencoder for another spec (``latent_storage: auto`` only).

        Raises:
            AECompressError: once optimizers exist (a strategy that restores checkpoints after
                configuring them, such as FSDP or DeepSpeed): they would hold the old parameters.
        """
        if spec != self.specs[group.name]:
            if self._trainer is not None and self.trainer.optimizers:
                raise AECompressError(
                    f"group {group.name!r}: this strategy built the optimizer before the checkpoint chose the latent "
                    f"width; set model.latent_storage to the width it records ({spec.latent_storage})"
                )
            self.specs[group.name] = spec
            self.aes[group_key(group.name)] = GroupAutoencoder(spec, group.rows)
            self._log_sizes([group])

    def choose_codes(self, group: WeightGroup, fact: Factorization, refine: bool | None = None) -> str:
        """``latent_storage: auto``: the code width whose start leaves the least error at this budget."""
        specs = self._fitting_widths(group, refine)
        options = {bits: [(fact, spec.latent)] for bits, spec in specs.items()}
        return specs[pick_bits(options, self.latent_layout == "balanced")].latent_storage

    def resolve_codes(self, group: WeightGroup, fact: Factorization) -> None:
        """``latent_storage: auto``: rebuild the group's autoencoder with the width :meth:`choose_codes` keeps.

        Under DDP every rank adopts rank 0's width, so shapes agree even where floating
        point ties could break differently on different machines.
        """
        width = self.choose_codes(group, fact)
        if self._trainer is not None:
            width = self.trainer.strategy.broadcast(width, src=0)
        self._adopt(group, self._solve(group, width))

    def adopt_checkpoint_specs(self, checkpoint: dict) -> None:
        """Take each group's choices from a checkpoint, as made when it was fitted.

        ``latent_storage: auto`` chose the code width and ``refine_codes: auto`` whether to
        refine. Only a spec this config could have chosen is adopted; anything else is left
        for the signature check to name.
        """
        choosing = self.latent_auto or self.refine_choice
        saved = (checkpoint.get(SIGNATURE) or {}).get("specs") if choosing else None
        for g in self.groups if isinstance(saved, dict) else []:
            try:
                spec = AESpec.from_dict(saved[g.name])
            except (AECompressError, AttributeError, KeyError, TypeError, ValueError):
                continue  # left for the signature check to name
            if spec.latent_bits is None or not (self.latent_auto or spec.latent_storage == self.latent_config):
                continue
            try:
                allowed = [self._solve(g, spec.latent_storage, refine) for refine in {self.refine_codes, False}]
            except AECompressError:
                continue  # a width this budget cannot hold: left for the signature check
            if spec in allowed:
                self._adopt(g, spec)
