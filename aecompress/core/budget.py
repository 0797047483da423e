"""The one place where stored size is counted.

Every compressor's stored form is a set of tensors (latents, decoder weights
and biases, norms, factors...). Its cost is what those tensors hold, counted
here and nowhere else, so a comparison "at ratio 10" is fair by construction.
The ratio is the original float32 bytes over the stored bytes; for stored forms
kept in float32 that is the same as original numbers over stored numbers.
Methods that store fewer bits (quantization, pruning masks, low-precision
latents) are counted by their bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from aecompress.core.errors import AECompressError


def stored_numbers(tensors: Mapping[str, torch.Tensor]) -> int:
    """How many numbers a stored form keeps."""
    return sum(t.numel() for t in tensors.values())


def stored_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """How many bytes a stored form keeps, at each tensor's own dtype."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


ORIGINAL_BYTES_PER_NUMBER = 4  # ratios are measured against the float32 original
BITS_PER_ORIGINAL = 8 * ORIGINAL_BYTES_PER_NUMBER
"""Bits of one original (float32) weight: the ceiling of every budget in bits per weight."""


def original_bytes(rows: int, width: int) -> int:
    """Bytes of a (rows x width) matrix in float32, the reference for every ratio."""
    return rows * width * ORIGINAL_BYTES_PER_NUMBER


def budget_bytes(rows: int, width: int, ratio: float) -> int:
    """The most bytes a stored form of a (rows x width) matrix may keep at ``ratio``."""
    return budget_numbers(rows, width, ratio) * ORIGINAL_BYTES_PER_NUMBER


def budget_numbers(rows: int, width: int, ratio: float) -> int:
    """The most numbers a stored form of a (rows x width) matrix may keep at ``ratio``."""
    if not ratio > 1:
        raise AECompressError(f"compression ratio must be greater than 1, got {ratio}")
    return math.floor(rows * width / ratio)


def largest_fitting(cost: Callable[[int], int], budget: int, upper: int) -> int | None:
    """The largest integer size in [1, upper] whose cost fits the budget (cost is increasing)."""
    if cost(1) > budget:
        return None
    lo, hi = 1, max(1, upper)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def infeasible(group: str, rows: int, width: int, ratio: float, smallest_cost: int, what: str) -> AECompressError:
    """The error for a ratio this group cannot reach, stating the feasible range."""
    max_ratio = rows * width / smallest_cost
    feasible = f"feasible ratios are 1 < ratio <= {max_ratio:.2f}" if max_ratio > 1 else "no ratio above 1 is feasible"
    return AECompressError(
        f"ratio {ratio} is infeasible for group {group!r} ({rows} x {width}) with {what}: "
        f"the smallest stored form keeps {smallest_cost} numbers; {feasible}"
    )


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits each take, packed end to end into uint8."""
    return math.ceil(count * bits / 8)


def infeasible_bytes(group: str, rows: int, width: int, ratio: float, smallest_bytes: int, what: str) -> AECompressError:
    """The error for a ratio this group cannot reach, with the smallest form counted in bytes.

    The budget is granted in whole float32 numbers (see :func:`budget_bytes`), so
    the highest feasible ratio is the one whose budget still holds ``smallest_bytes``.
    """
    max_ratio = rows * width / math.ceil(smallest_bytes / ORIGINAL_BYTES_PER_NUMBER)
    max_ratio = math.floor(max_ratio * 100) / 100  # rounded down, so the stated bound is always feasible
    return AECompressError(
        f"ratio {ratio} is infeasible for group {group!r} ({rows} x {width}) with {what}: "
        f"the smallest stored form takes {smallest_bytes} bytes; feasible ratios are 1 < ratio <= {max_ratio:.2f}"
    )


def bits_per_weight(stored: int, numbers: int) -> float:
    """Stored bits per original weight: the size in the unit the field compares methods by."""
    return 8 * stored / numbers if numbers else float("nan")


def whole_model(params: Mapping[str, torch.Tensor], covered: Mapping[str, int], stored: int) -> dict[str, float | int]:
    """The size of a whole checkpoint whose covered weights are stored in ``stored`` bytes.

    Args:
        params: every parameter of the model by name (tied parameters once).
        covered: parameter name -> how many of its numbers the compressed groups hold.
        stored: the compressed groups' stored bytes (counted by :func:`stored_bytes`).

    Returns:
        ``parameters``, ``stored_bytes`` (compressed groups plus every other weight at its own
        dtype), ``bits_per_weight`` and ``ratio`` (against the whole model in float32).
    """
    total = sum(p.numel() for p in params.values())
    rest = sum((p.numel() - covered.get(name, 0)) * p.element_size() for name, p in params.items())
    size = stored + rest
    return {"parameters": total, "stored_bytes": size, "bits_per_weight": bits_per_weight(size, total),
            "ratio": original_bytes(total, 1) / size if size else float("nan")}
