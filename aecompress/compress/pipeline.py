"""The closed-form pipeline: statistics, allocation, compression and the optional scale tune.

``aecompress compress`` and every closed-form row of ``aecompress benchmark`` go through
:func:`closed_form`, so an export is exactly the model a benchmark row of the same method,
options and budget measured.
"""

from __future__ import annotations

import aecompress.methods as catalogue
from aecompress.blocks.base import GroupStats
from aecompress.compress.choices import MethodChoice
from aecompress.compress.tuning import checked_options, spread, tune
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup, extract_rows
from aecompress.core.progress import progress
from aecompress.core.stored import StoredForm
from aecompress.data.calibration import Calibration
from aecompress.evaluation import allocation


def closed_form(model, calibration: Calibration, choice: MethodChoice, groups: list[WeightGroup], target: Budget,
                damage) -> tuple[list[StoredForm], allocation.Plan | None]:
    """A closed-form method's stored forms within ``target``, with the calibration statistics it needs, allocated as
    ``choice`` asks, then fine-tuned if it asks (``damage``: a callable giving the allocator's measure, only
    called for a measured plan). The plan is printed before anything is compressed, and returned (None for uniform)."""
    check_tune(choice)
    several = spread(choice.tune)
    if several:  # Lightning's launcher would run the whole benchmark again in every other process
        key, value = several
        raise AECompressError(f"tune {key} {value}: a benchmark tunes in one process; several processes are for "
                              "`aecompress compress --devices N --strategy ddp`")
    stats: dict[str, GroupStats] = {}
    for kind in catalogue.get(choice.method).needs:
        model.requires_grad_(True)  # Fisher needs weight gradients; an AE run may have frozen them
        stats = calibration.stats(groups, kind)
    rows = {g.name: extract_rows(model, g) for g in groups}

    def compress_at(group: WeightGroup, at: Budget) -> StoredForm:
        return catalogue.compress(choice.method, group, rows[group.name], at, stats.get(group.name), **choice.options)

    budgets, chosen = {g.name: target for g in groups}, None
    if choice.allocation != "uniform" and catalogue.get(choice.method).budgeted:
        chosen = allocation.plan(model, groups, rows, compress_at, damage(), target, choice.allocation)
        print(chosen.table(groups), flush=True)
        budgets = chosen.budgets()
    forms = [compress_at(g, budgets[g.name]) for g in progress(groups, "compress", "group")]
    return tuned(model, calibration, choice, forms), chosen


def check_tune(choice: MethodChoice) -> None:
    """One clear error for tuning a method that has no scales, or an unknown or invalid tune option."""
    if choice.tune and not catalogue.get(choice.method).tunable:
        raise AECompressError(f"method {choice.method!r} has no scales to tune; tune works on: {', '.join(catalogue.tunable())}")
    checked_options(choice.tune)


def tuned(model, calibration: Calibration, choice: MethodChoice, forms: list[StoredForm]) -> list[StoredForm]:
    """The forms with their scales fine-tuned together on the calibration windows, if ``choice`` asks."""
    if not choice.tune:
        return forms
    return tune(model, forms, calibration.windows(), **checked_options(choice.tune))


