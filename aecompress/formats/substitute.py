"""Decoded rows in a model for as long as they are needed, and the model's own rows back afterwards.

Export, the benchmark and model-level validation all measure or write a model with
compressed weights in place of its own; this is the one place that decodes the forms,
refuses a form that does not decode to finite numbers, writes the rows in and restores them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup, assign_rows, extract_rows
from aecompress.core.progress import progress
from aecompress.core.stored import StoredForm
from aecompress.methods import decode


def decode_all(forms: Iterable[StoredForm]) -> dict[WeightGroup, torch.Tensor]:
    """Every form decoded, refusing one that holds NaN or inf (a damaged checkpoint or export)."""
    decoded = {}
    for form in progress(forms, "decode", "group"):
        rows = decode(form)
        if not torch.isfinite(rows).all():
            raise AECompressError(
                f"group {form.group.name!r} ({form.method}) decodes to NaN or inf; its stored tensors are damaged"
            )
        decoded[form.group] = rows
    return decoded


@contextlib.contextmanager
def substituted(
    model: nn.Module, decoded: dict[WeightGroup, torch.Tensor], originals: dict[str, torch.Tensor] | None = None
) -> Iterator[nn.Module]:
    """The model with these rows in place of its own; its own rows are written back on exit.

    Args:
        model: the model, changed in place while the block runs.
        decoded: group -> decoded rows (see :func:`decode_all`).
        originals: group name -> the model's own rows, where the caller holds them already;
            read from the model otherwise.
    """
    if originals is None:
        originals = {group.name: extract_rows(model, group) for group in decoded}
    try:
        for group, rows in decoded.items():
            assign_rows(model, group, rows)
        yield model
    finally:
        for group in decoded:
            assign_rows(model, group, originals[group.name])
