"""Grouped k-bit codes whose rounding compensates its own error on the calibration inputs.

Round-to-nearest rounds every weight on its own. Here the columns of each matrix are rounded one
at a time, and the error each leaves is carried into the columns not yet rounded, weighted by the
inverse of the input second moment ``H = E[x xᵀ]`` (the optimal-brain-surgeon update), so that the
layer's outputs on calibration inputs move as little as possible. The stored form is exactly
``quantize``'s with ``group_size`` (codes, a scale and a zero per group of columns, counted the
same way), and decodes and runs with its code; only the choice of codes differs. A group's scale
and zero are set from its columns as they stand when the group is reached: by default the clipped
range whose rounding error is least (``grid: mse``, see :mod:`aecompress.methods.quantize`), which
on all-MiniLM-L6-v2 at 2.5 bits per weight raised embedding fidelity on validation from 0.161
(min-max) to 0.657 at the same bytes. By default each zero point is an integer code on its group's
grid (``zeros: int``), a few bits instead of a float16, and the bytes it frees widen more rows.

With ``fill``, the bytes a whole code width leaves unspent widen some rows by one bit
(:mod:`aecompress.blocks.mixed_rows`): the rows whose rounding error, weighted by their inputs'
second moment, falls most from the extra bit.
"""

from __future__ import annotations

import torch

from aecompress.blocks import feedback, mixed_rows
from aecompress.blocks import grids as kbit
from aecompress.blocks.base import Built, GroupStats, Method, float_dtype, meta, needs_stats
from aecompress.core.budget import Budget, infeasible_bytes, largest_fitting
from aecompress.core.dtypes import FloatDtype
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.core.stored import StoredForm
from aecompress.methods import quantize

MAX_BITS = 8
AUTO_GROUP_SIZES = (96, 128, 64, 192, 32)
"""``group_size: auto`` takes the first of these that divides the width (96 measured best on SmolLM2 and MiniLM)."""


def _levels(bits: int, wide: torch.Tensor) -> torch.Tensor:
    """Each row's largest code: ``2^bits - 1``, or ``2^(bits+1) - 1`` for a wide row."""
    return torch.where(wide, 2 ** (bits + 1) - 1, 2**bits - 1).float()


def _row_errors(w: torch.Tensor, h: torch.Tensor, levels: torch.Tensor, g: int, store: torch.dtype,
                kind: str, zeros: str) -> torch.Tensor:
    """Each row's round-to-nearest error, weighted per column by its inputs' mean square (the diagonal of H)."""
    rows, cols = w.shape
    grouped = w.float().reshape(rows * (cols // g), g)
    repeat = levels.repeat_interleave(cols // g)
    scale, zero = kbit.fitted(grouped, repeat, store, kind, zeros)
    q = zero.float().unsqueeze(1) + scale.float().unsqueeze(1) * kbit.rounded(
        grouped, scale.unsqueeze(1), zero.unsqueeze(1), repeat.unsqueeze(1))
    return ((grouped - q) ** 2).view(rows, cols).mul(torch.diagonal(h).float().clamp(min=0)).sum(dim=1)


def _widest(rows: torch.Tensor, stats: GroupStats, bits: int, count: int, g: int, store: torch.dtype,
            kind: str, zeros: str) -> torch.Tensor:
    """The ``count`` rows whose weighted rounding error falls most with one more bit (a bool per row)."""
    gains = []
    for w, h in zip(rows.split(list(stats.member_rows)), stats.covariances):
        narrow = torch.zeros(w.shape[0], dtype=torch.bool)
        before, after = (_row_errors(w, h, _levels(bits, flags), g, store, kind, zeros) for flags in (narrow, ~narrow))
        gains.append(before - after)
    wide = torch.zeros(rows.shape[0], dtype=torch.bool)
    wide[torch.cat(gains).topk(count).indices] = True
    return wide


def _member(w: torch.Tensor, h: torch.Tensor, levels: torch.Tensor, g: int, store: torch.dtype, damp: float,
            order: str = "natural", kind: str = "minmax", zeros: str = "float"):
    """One matrix's codes, scales and zeros (``levels``: each row's largest code), columns rounded in order
    with the error carried forward.

    ``natural``: columns left to right, each group's grid set from its columns as they stand when
    reached. ``activation``: the columns with the largest input second moment first (their errors
    are the costliest, so they are rounded while the most columns remain to absorb them), every
    group's grid set beforehand from the original columns, since a group is no longer reached at once.

    The error of each column is carried at once into the columns of its own batch (:func:`_batch_columns`), and
    into the columns after the batch by one product when the batch is done (GPTQ's lazy batch update): the same
    sums in another order. Carried column by column into every later column, a 4096 x 11008 matrix streamed about
    2 TB of float64 through memory; batched, the work is matrix products.
    """
    rows, cols = w.shape
    perm = torch.argsort(torch.diagonal(h), descending=True) if order == "activation" else torch.arange(cols)
    factor = feedback.inverse_factor(h[perm][:, perm] if order == "activation" else h, damp)  # it copies h itself
    grids = [kbit.fitted(w[:, s : s + g].float(), levels, store, kind, zeros) for s in range(0, cols, g)] \
        if order == "activation" else [None] * (cols // g)
    w = w.to(torch.float64, copy=True)  # one copy: the updates below never touch the caller's rows
    if order == "activation":
        w = w[:, perm]
    codes = torch.zeros(rows, cols, dtype=torch.int32)
    step = _batch_columns(g, cols)
    for start in range(0, cols, step):
        end = min(start + step, cols)
        errors = torch.empty(rows, end - start, dtype=torch.float64)
        for jj in range(start, end):
            j = int(perm[jj])
            if order == "natural" and j % g == 0:
                grids[j // g] = kbit.fitted(w[:, jj : jj + g].float(), levels, store, kind, zeros)
            scale, zero = grids[j // g]
            q = kbit.rounded(w[:, jj].float(), scale, zero, levels)
            codes[:, j] = q.to(torch.int32)
            errors[:, jj - start] = (w[:, jj] - (zero.double() + scale.double() * q.double())) / factor[jj, jj]
            w[:, jj + 1 : end] -= errors[:, jj - start].unsqueeze(1) * factor[jj, jj + 1 : end].unsqueeze(0)
        w[:, end:] -= errors @ factor[start:end, end:]
    return codes, torch.stack([s for s, _ in grids], 1), torch.stack([z for _, z in grids], 1)


BATCH = 128
"""Columns whose errors are carried into the later columns together (GPTQ's lazy batch; 128 as GPTQ uses)."""


def _batch_columns(g: int, cols: int) -> int:
    """Whole groups of about :data:`BATCH` columns, so that a group's columns are in one batch when its grid is set
    from them (every earlier column's error already carried in); one group wider than that is its own batch."""
    return min(cols, g * max(1, BATCH // g))


def compress(
    group: WeightGroup,
    rows: torch.Tensor,
    target: Budget,
    stats: GroupStats | None = None,
    *,
    code_bits: int | None = None,
    group_size: int | str | None = None,
    dtype: FloatDtype = "float16",
    damp: float = 0.01,
    fill: bool = False,
    order: str = "natural",
    grid: str = "mse",
    zeros: str = "int",
) -> StoredForm:
    """Codes of ``code_bits`` bits (default: the most that fit) per ``group_size`` columns, error-compensated.

    Args:
        code_bits: code width in 1..8; ``None`` takes the largest that fits the budget (formerly ``bits``).
        group_size: columns sharing one scale and zero point (e.g. 64); must divide the width;
            ``None``: one per row; ``auto``: the first of :data:`AUTO_GROUP_SIZES` that divides it.
        dtype: the stored dtype of each scale and zero point.
        damp: ridge added to the input second moment, relative to its mean diagonal.
        fill: widen by one bit the rows that gain most, as many as the bytes left by ``code_bits`` allow.
        order: ``natural`` (left to right) or ``activation`` (largest input second moment first, as
            GPTQ's act-order with static groups).
        grid: ``mse`` (each group's clipped range with least rounding error) or ``minmax`` (its own range).
        zeros: ``int`` (each zero point a code on its group's grid, as wide as the row's codes) or ``float``
            (a zero point in ``dtype``).
    """
    if code_bits is not None and (isinstance(code_bits, bool) or not isinstance(code_bits, int)
                                  or not 1 <= code_bits <= MAX_BITS):
        raise AECompressError(f"compensated code_bits {code_bits!r} is not a code width; it must be an integer in 1..{MAX_BITS}")
    feedback.check_damp(damp, "compensated")
    store = float_dtype(dtype, group, "compensated")
    stats = needs_stats(stats, "covariance", group, "compensated")
    m, n = group.rows, group.width
    if group_size == "auto":
        group_size = next((g for g in AUTO_GROUP_SIZES if n % g == 0), None)
    group_size = n if group_size is None else group_size
    if not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise AECompressError(f"compensated group_size {group_size!r} must divide group {group.name!r}'s width {n}")
    feedback.member_covariances(stats, group, "compensated")
    if order not in ("natural", "activation"):
        raise AECompressError(f"compensated order {order!r} is not one of: natural, activation")
    kind = kbit.check_grid(grid, "compensated", zeros)
    if not isinstance(fill, bool):
        raise AECompressError(f"compensated fill must be true or false, got {fill!r}")
    budget = target.bytes(m, n)

    def cost(k: int) -> int:
        return kbit.code_cost(m, n, k, group_size, store, zeros)

    chosen = largest_fitting(cost, budget, MAX_BITS) if code_bits is None else code_bits
    if chosen is None or cost(chosen) > budget:
        raise infeasible_bytes(group.name, m, n, target, cost(chosen or 1), f"compensated ({chosen or 1} bits, {dtype})")
    count = (mixed_rows.most_wide(m, n, chosen, group_size, store, budget, zeros)
             if fill and chosen < MAX_BITS else 0)
    wide = _widest(rows, stats, chosen, count, group_size, store, kind, zeros) if count else torch.zeros(m, dtype=torch.bool)
    parts = [_member(w, h, _levels(chosen, flags), group_size, store, damp, order, kind, zeros) for w, h, flags in
             zip(rows.split(list(stats.member_rows)), stats.covariances, wide.split(list(stats.member_rows)))]
    codes, scale, zero = (torch.cat([p[i] for p in parts]) for i in range(3))
    if count:
        tensors = mixed_rows.tensors(codes, wide, chosen, scale, zero, zeros)
    else:
        tensors = kbit.stored(codes, chosen, scale, zero, zeros)
    return StoredForm("compensated", group, tensors, meta(target, budget, bits=chosen, dtype=dtype,
                                                          group_size=group_size, damp=damp, wide_rows=count,
                                                          order=order, grid=kind, zeros=zeros))


def runtime(form: StoredForm, member_rows: list[int]) -> Built:
    """Mixed-width forms keep both code streams; single-width forms are exactly ``quantize``'s."""
    return (mixed_rows.runtime if "wide" in form.tensors else quantize.runtime)(form, member_rows)


def decode(form: StoredForm) -> torch.Tensor:
    """Every row of the group, decoded as the form was stored (one width or two)."""
    return (mixed_rows.decode if "wide" in form.tensors else quantize.decode)(form)


def codes(form: StoredForm) -> kbit.GridCodes:
    """The form's integers on one code width; with rows one bit wider (``fill``), every row on the wider width."""
    return (mixed_rows.grid_codes if "wide" in form.tensors else kbit.grid_codes)(form)


METHOD = Method("compensated", decode=decode, runtime=runtime, compress=compress, needs=("covariance",), tunable=True,
                defaults={"group_size": "auto", "fill": True}, tune_steps=100, renamed={"bits": "code_bits"}, codes=codes,
                reported=True)
"""Its defaults and tune steps are the best whole-model recipe measured on validation (docs/results.md); it is
``reported`` (untuned, with its defaults) beside every fit, so a first run sees our best closed-form method too."""
