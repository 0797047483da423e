"""The one interface every compression method implements, and what a method may ask for.

A method is a :class:`Method`: how it compresses a weight group into a
:class:`~aecompress.core.stored.StoredForm`, how it decodes one, how its form runs per
layer (row sources, see :mod:`aecompress.core.rowsource`), and which calibration
statistics it needs. The fixed table in :mod:`aecompress.methods` lists them; export,
evaluation, the run-time form and the benchmark only ever go through that table.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from aecompress.core.budget import Budget
from aecompress.core.dtypes import FLOAT_DTYPES
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.rowsource import RowSource
from aecompress.core.stored import StoredForm

Built = tuple[list[nn.Module], list[RowSource]]
"""A form's run-time parts: modules its members share (a decoder, a basis), and one row source per member."""


@dataclass
class GroupStats:
    """Calibration statistics of one weight group, aligned with ``group.members``.

    Attributes:
        tokens: calibration tokens the statistics were computed over.
        covariances: per member, the (width x width) float64 second moment of
            its inputs per token, or ``None`` for a member with no linear input
            (an embedding); ``None`` if covariances were not collected.
        fisher: per member, the float64 Fisher row weights (one per row);
            ``None`` if they were not collected.
        member_rows: rows of each member matrix, in group order.
    """

    tokens: int
    covariances: list[torch.Tensor | None] | None = None
    fisher: list[torch.Tensor] | None = None
    member_rows: list[int] | None = None

    def mean_covariance(self) -> torch.Tensor | None:
        """The members' covariances averaged, or None if any member has none."""
        if not self.covariances or any(c is None for c in self.covariances):
            return None
        return torch.stack(self.covariances).mean(dim=0)

    def row_weights(self) -> torch.Tensor | None:
        """All members' Fisher row weights, stacked in group row order."""
        return None if self.fisher is None else torch.cat(list(self.fisher))


@dataclass(frozen=True)
class Method:
    """One compression method.

    Attributes:
        name: the name stored forms, configs and results use.
        decode: stored form -> its (rows x width) float32 matrix.
        runtime: stored form and member row counts -> its run-time parts (see :data:`Built`).
        compress: ``(group, rows, target, stats, **options) -> StoredForm`` at or under ``target``, a
            :class:`~aecompress.core.budget.Budget`;
            None for a method that is trained (``aecompress fit`` or a benchmark recipe).
        build: for a trained method, how it builds a group's trainable codec within a budget:
            ``(group, target, **options) -> nn.Module`` whose ``forward(rows, index, norms)`` gives the
            decoded rows at ``index`` (differentiably) and whose ``stored_tensors(rows)`` gives what its stored
            form keeps, which ``decode`` reads back. ``aecompress fit`` trains it when ``model.method`` names it.
            None for the autoencoder (``ae``), which the training module sizes and starts itself.
        needs: the calibration statistics ``compress`` reads (``covariance``, ``fisher``).
        budgeted: whether ``compress`` meets a byte budget; False for a method whose size is its own
            (another package's quantized checkpoint), which the benchmark measures once at that size.
        tunable: whether its decoded rows are stored scales times fixed codes, so that the whole-model
            scale tune (:mod:`aecompress.compress.tuning`) can refine the scales in place.
        defaults: the options ``aecompress compress`` gives it when none are given: its best measured recipe.
        tune_steps: the scale-tune steps ``aecompress compress`` gives it when ``--tune_steps`` is not given.
        renamed: old option name -> new one, still accepted with a deprecation line (configs written before).
        reported: shown beside every fit at the same budget, in the table a fit ends with.
        codes: for a method whose forms are integer codes on grids, stored form -> its
            :class:`~aecompress.blocks.grids.GridCodes` (one code width, integer zero codes), refusing a form
            that has none in one line naming the option to change; what integer-code export formats write.
    """

    name: str
    decode: Callable[[StoredForm], torch.Tensor]
    runtime: Callable[[StoredForm, list[int]], Built] | None = None
    compress: Callable[..., StoredForm] | None = None
    needs: tuple[str, ...] = ()
    budgeted: bool = True
    tunable: bool = False
    defaults: dict = field(default_factory=dict)
    tune_steps: int = 0
    renamed: dict = field(default_factory=dict)
    build: Callable[..., nn.Module] | None = None
    reported: bool = False
    codes: Callable[[StoredForm], object] | None = None

    @property
    def trained(self) -> bool:
        """Whether forms of this method come from training rather than a closed-form compressor."""
        return self.compress is None

    def current(self, opts: dict) -> dict:
        """``opts`` with renamed options under their new names, each old name told once as deprecated."""
        out = dict(opts)
        for old, new in self.renamed.items():
            if old not in out:
                continue
            if new in out:
                raise AECompressError(f"method {self.name!r}: give {new!r} only ({old!r} is its old name), not both")
            warnings.warn(f"option {old!r} of method {self.name!r} is now {new!r} (the code width; budgets are bits "
                          f"per weight); {old!r} still works for now", FutureWarning, stacklevel=3)
            out[new] = out.pop(old)
        return out

    def unknown(self, opts: dict) -> list[str]:
        """The names in ``opts`` that are neither its options nor their old names, sorted."""
        return sorted(set(opts) - set(self.options()) - set(self.renamed))

    def options(self) -> dict[str, object]:
        """The compressor's (or a trained method's builder's) keyword options and their defaults."""
        made_by = self.compress or self.build
        if made_by is None:
            return {}
        params = inspect.signature(made_by).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def choice(value, valid, what: str, group: WeightGroup, method: str):
    """``value`` if it is one of ``valid``, else one line naming it and the valid choices."""
    if value not in valid:
        raise AECompressError(f"unknown {what} {value!r} for method {method!r} on group {group.name!r}; "
                              f"valid: {', '.join(map(str, valid))}")
    return value


def float_dtype(dtype: str, group: WeightGroup, method: str) -> torch.dtype:
    """The torch dtype a ``dtype`` option names, checked."""
    return FLOAT_DTYPES[choice(dtype, tuple(FLOAT_DTYPES), "dtype", group, method)]


def meta(target: Budget | None, budget: int, **extra) -> dict:
    """A stored form's metadata: the target it was made for (as the ratio every export has recorded),
    its byte budget, and what was chosen."""
    return {"target_ratio": None if target is None else target.ratio, "budget_bytes": budget, **extra}


CODE_BITS = range(1, 9)
"""The code widths a stored form may name."""


def check_fields(form: StoredForm) -> None:
    """The metadata fields methods share, checked where a stored form is read back from a file.

    Decoding trusts them (a code width, columns per scale, the ratio a budget came from), so a
    value that cannot be right is refused in one line rather than decoded into wrong numbers.
    """
    name, info, width = form.group.name, form.meta, form.group.width
    if not isinstance(info, dict):
        raise AECompressError(f"group {name!r}: its meta is a {type(info).__name__}, not a mapping")
    bits, size, target = info.get("bits"), info.get("group_size"), info.get("target_ratio")
    if bits is not None and not (_integer(bits) and bits in CODE_BITS):
        raise AECompressError(f"group {name!r}: bits {bits!r} is not a code width; valid: 1..{CODE_BITS[-1]}")
    if size is not None and not (_integer(size) and size >= 1 and width % size == 0):
        raise AECompressError(f"group {name!r}: group_size {size!r} does not divide its rows' width {width}; "
                              f"valid: a divisor of {width}")
    if target is not None and not (isinstance(target, (int, float)) and not isinstance(target, bool) and target > 0):
        raise AECompressError(f"group {name!r}: target_ratio {target!r} is not a positive number")


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def item_size(dtype: torch.dtype) -> int:
    """Bytes per element of a dtype."""
    return torch.empty((), dtype=dtype).element_size()


def needs_stats(stats: GroupStats | None, kind: str, group: WeightGroup, method: str) -> GroupStats:
    """The statistics a method needs, or one line saying how to collect them."""
    present = stats is not None and getattr(stats, "covariances" if kind == "covariance" else "fisher") is not None
    if not present:
        what = "input covariances" if kind == "covariance" else "Fisher row weights"
        raise AECompressError(
            f"method {method!r} needs {what} for group {group.name!r}: "
            f"collect them with aecompress.data.calibration.collect(..., what=({kind!r},))"
        )
    return stats


def offsets(sizes: list[int]) -> list[int]:
    """Where each member's rows start in the stacked group."""
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out
