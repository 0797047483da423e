"""Every compression method, in one fixed table, and the entry points that use it.

A method is one module here exporting ``METHOD`` (see :class:`~aecompress.blocks.base.Method`):
its compressor, decoder, run-time row sources and the statistics it needs. ``METHODS`` is
filled from below, by importing those modules; nothing in it is looked up by a name read
from a file or a config, and no layer above names a method. Adding a method is one new
module and one line in the table.
"""

from __future__ import annotations

import logging

import torch

from aecompress.blocks.base import Built, GroupStats, Method
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.stored import StoredForm
from aecompress.methods import (
    autoencoder,
    compensated,
    entropy_coded,
    external,
    fwsvd,
    kronecker,
    prune,
    quantize,
    svd,
    tucker,
    whitened_svd,
)

log = logging.getLogger(__name__)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        svd.METHOD,
        fwsvd.METHOD,
        whitened_svd.METHOD,
        prune.METHOD,
        quantize.METHOD,
        compensated.METHOD,
        entropy_coded.METHOD,
        kronecker.METHOD,
        tucker.METHOD,
        autoencoder.METHOD,
        external.METHOD,
    )
}
"""Method name -> method: the only place the package lists its methods."""

AUTOENCODER = autoencoder.METHOD.name
"""The trained method ``aecompress fit`` trains unless ``model.method`` names another."""
ALLOCATION_PROXY = (whitened_svd.METHOD.name, {"dtype": "float16", "codes": "auto"})
"""The closed-form method (and options) a trained method's measured allocation measures each group's
sensitivity with: the start the autoencoder's best recipes train from."""
BEST_CLOSED_FORM = compensated.METHOD.name
"""The closed-form method ``aecompress compress`` uses unless ``--method`` names another (docs/results.md)."""


def get(name: str) -> Method:
    """The method of this name, or one line listing the valid ones."""
    if name not in METHODS:
        raise AECompressError(f"unknown compression method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def compressors() -> list[str]:
    """Names of the methods that compress any group to a budget in closed form (not trained, not another package's)."""
    return [name for name, m in METHODS.items() if not m.trained and m.budgeted]


def tunable() -> list[str]:
    """Names of the methods whose scales the whole-model tune can refine."""
    return [name for name, m in METHODS.items() if m.tunable]


def options(name: str) -> dict[str, object]:
    """A method's options and their defaults."""
    return get(name).options()


def compress(
    method: str,
    group: WeightGroup,
    rows: torch.Tensor,
    target: Budget | None,
    stats: GroupStats | None = None,
    **opts,
) -> StoredForm:
    """Compress one weight group with a closed-form method within a budget.

    Args:
        method: a name from ``METHODS`` with a compressor (see :func:`compressors`).
        group: the weight group.
        rows: ``core.groups.extract_rows(model, group)``: float32, rows x width.
        target: the budget in bits per weight; None for a method whose size is its own (another package's).
        stats: calibration statistics of the group (what the method ``needs``).
        **opts: the method's options (see :func:`options`).

    Returns:
        A stored form at or under the byte budget; ``meta`` records what was chosen.

    Raises:
        AECompressError: for an unknown method or option, or a budget the method
            cannot reach (the message gives the feasible range).
    """
    chosen = get(method)
    if chosen.trained:
        raise AECompressError(
            f"method {method!r} is trained, not computed: use `aecompress fit` or a benchmark recipe; "
            f"closed-form methods: {', '.join(compressors())}"
        )
    unknown = chosen.unknown(opts)
    if unknown:
        raise AECompressError(f"unknown option {unknown[0]!r} for method {method!r}; "
                              f"valid: {', '.join(chosen.options()) or '(none)'}")
    opts = chosen.current(opts)
    if tuple(rows.shape) != (group.rows, group.width):
        raise AECompressError(f"group {group.name!r} has shape {(group.rows, group.width)}, got rows {tuple(rows.shape)}")
    if not torch.isfinite(rows).all():
        raise AECompressError(f"group {group.name!r} holds NaN or inf weights; fix the checkpoint before compressing")
    form = chosen.compress(group, rows.detach().cpu().float(), target, stats, **opts)
    if not chosen.budgeted:  # its size is its own; the accountant counts it all the same
        log.info("%s on %s: %d bytes, ratio %.3f", method, group.name, form.bytes, form.ratio)
        return form
    budget = target.bytes(group.rows, group.width)
    if form.bytes > budget:  # the accountant is the judge; a compressor that overspends is a bug
        raise RuntimeError(f"{method} stored {form.bytes} bytes for {group.name!r}, over its budget of {budget}")
    log.info("%s on %s: %d bytes (budget %d), ratio %.3f (target %.3f)",
             method, group.name, form.bytes, budget, form.ratio, target.ratio)
    return form


def decode(stored: StoredForm) -> torch.Tensor:
    """Decode a stored form to its (rows x width) float32 matrix."""
    method = get(stored.method)
    # Decode from fresh contiguous copies: CPU matmul kernels can round differently on
    # memory that is not 64-byte aligned (tensors read from a safetensors file often
    # are not), and a form must decode to the same bits wherever its tensors live.
    fresh = {k: t.clone(memory_format=torch.contiguous_format) for k, t in stored.tensors.items()}
    rows = method.decode(StoredForm(stored.method, stored.group, fresh, stored.meta))
    expected = (stored.group.rows, stored.group.width)
    if tuple(rows.shape) != expected:
        raise AECompressError(f"group {stored.group.name!r} decodes to {tuple(rows.shape)}, expected {expected}")
    return rows


def grid_codes(stored: StoredForm):
    """A form's integer codes, scales and zero codes on one width (:class:`~aecompress.blocks.grids.GridCodes`).

    Raises:
        AECompressError: naming the group, for a method that stores no integer codes or a form that cannot be one width.
    """
    method = get(stored.method)
    if method.codes is None:
        coded = [name for name, m in METHODS.items() if m.codes is not None]
        raise AECompressError(
            f"group {stored.group.name!r} uses method {stored.method!r}, which stores no integer codes; integer-code "
            f"formats hold only {', '.join(coded)} forms: use --format decoded or compact, or --method {coded[-1]}")
    return method.codes(stored)


def runtime_parts(stored: StoredForm, member_rows: list[int]) -> Built:
    """A form's run-time parts: the modules its members share and one row source per member.

    Raises:
        AECompressError: naming the group, if the method has no per-layer run-time form.
    """
    method = get(stored.method)
    if method.runtime is None:
        runnable = [name for name, m in METHODS.items() if m.runtime is not None]
        raise AECompressError(
            f"group {stored.group.name!r} uses method {stored.method!r}, which has no per-layer run-time form "
            f"(run-time methods: {', '.join(runnable)}); load it with materialize=True instead"
        )
    return method.runtime(stored, member_rows)
