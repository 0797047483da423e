"""What a run chooses: which weights (groups) and which methods, with their options, allocation and tune."""

from __future__ import annotations

from dataclasses import dataclass, field


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
        method: a name from ``aecompress.methods.METHODS`` (``svd``, ``whitened_svd``, ``quantize``, ``ae``...).
        name: the method's name in the results (defaults to ``method``).
        options: the baseline's keyword options (see ``aecompress.methods.options``).
        mode: override the group's mode (e.g. ``separated`` for per-layer SVD).
        recipe: for ``ae``: a fit config (YAML) whose ``model``, ``trainer`` and ``data``
            training settings are used; the model, modules, mode and ratio come from the benchmark.
        overrides: for ``ae``: dotted keys replacing recipe values, e.g.
            ``{"model.storage_dtype": "float16", "trainer.max_steps": 100}``.
        allocation: how a budget is shared by the groups: ``uniform`` (every group the same bits
            per weight) or ``measured`` (by sensitivity per byte on calibration text, the same total;
            see ``aecompress.evaluation.allocation``). For a trained method, set ``data.allocation``
            in its recipe instead.
        tune: for ``quantize`` and ``compensated``: fine-tune every group's scales together against the
            original model's outputs on the calibration windows after compressing, e.g. ``{steps: 100,
            lr: 0.001}`` (see ``aecompress.compress.tuning``); empty: no tuning.
    """

    method: str
    name: str | None = None
    options: dict = field(default_factory=dict)
    mode: str | None = None
    recipe: str | None = None
    overrides: dict = field(default_factory=dict)
    allocation: str = "uniform"
    tune: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The name shown in results."""
        return self.name or self.method
