"""The one place where stored size is counted, and the one vocabulary of budgets.

Every compressor's stored form is a set of tensors (latents, decoder weights
and biases, norms, factors...). Its cost is what those tensors hold, counted
here and nowhere else, so a comparison "at ratio 10" is fair by construction.
The ratio is the original float32 bytes over the stored bytes; for stored forms
kept in float32 that is the same as original numbers over stored numbers.
Methods that store fewer bits (quantization, pruning masks, low-precision
latents) are counted by their bytes.

A budget travels as one :class:`Budget` (stored bits per original weight, held exactly)
from the command line or config down to the method, and becomes bytes in exactly one
place, :meth:`Budget.bytes`. A ratio is only another way to write it at the edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction

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


def _exact(value: float | Fraction) -> Fraction:
    """The number a float was written as (its shortest decimal), exactly: 0.1 is 1/10, not 3602879701896397/2**55."""
    return Fraction(repr(value)) if isinstance(value, float) else Fraction(value)


@dataclass(frozen=True)
class Budget:
    """A storage budget: stored bits per original weight, exact, the one unit from the edge to a method.

    It is held as a fraction of the decimals the user wrote (``2.5`` bits is 5/2, ``ratio 12.8`` is
    32 / (64/5) = 5/2 bits), so a budget written as a ratio and the same budget written in bits
    grant exactly the same bytes, with no float rounding between them.
    """

    bits: Fraction

    @classmethod
    def of_bits(cls, bits: float | Fraction, what: str = "bits per weight") -> Budget:
        """A budget given in bits per weight; one clear error outside (0, 32)."""
        if isinstance(bits, bool) or not isinstance(bits, int | float | Fraction) or not 0 < bits < BITS_PER_ORIGINAL:
            raise AECompressError(f"{what} {bits!r} must be above 0 and below {BITS_PER_ORIGINAL} "
                                  f"(a float32 weight is {BITS_PER_ORIGINAL} bits)")
        return cls(_exact(bits))

    @classmethod
    def of_ratio(cls, ratio: float, what: str = "compression ratio") -> Budget:
        """A budget given as original float32 bytes over stored bytes (``ratio = 32 / bits``)."""
        if isinstance(ratio, bool) or not isinstance(ratio, int | float | Fraction) or not ratio > 1 or math.isinf(ratio):
            raise AECompressError(f"{what} must be greater than 1, got {ratio}")
        return cls(BITS_PER_ORIGINAL / _exact(ratio))

    @classmethod
    def parse(cls, text: str) -> Budget:
        """A budget from :meth:`text` (how configs and checkpoints carry it exactly)."""
        return cls.of_bits(Fraction(text))

    @property
    def text(self) -> str:
        """The exact bits per weight as text (``16/5``), for configs and checkpoints."""
        return str(self.bits)

    @property
    def ratio(self) -> float:
        """The same budget as a ratio, for display and for metadata written before budgets were bits."""
        return float(BITS_PER_ORIGINAL / self.bits)

    def bytes(self, rows: int, width: int) -> int:
        """The most bytes a stored form of a (rows x width) matrix may keep: where a budget becomes bytes.

        Granted in whole float32 numbers (a multiple of 4 bytes), as every budget always was.
        """
        return math.floor(rows * width * self.bits / BITS_PER_ORIGINAL) * ORIGINAL_BYTES_PER_NUMBER

    def __str__(self) -> str:
        return f"{float(self.bits):.4g} bits per weight (ratio {self.ratio:.4g})"


def original_bytes(rows: int, width: int) -> int:
    """Bytes of a (rows x width) matrix in float32, the reference for every ratio."""
    return rows * width * ORIGINAL_BYTES_PER_NUMBER


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


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits each take, packed end to end into uint8."""
    return math.ceil(count * bits / 8)


def infeasible_bytes(group: str, rows: int, width: int, budget: Budget, smallest_bytes: int, what: str) -> AECompressError:
    """The error for a budget this group cannot reach, with the smallest form counted in bytes.

    The bound is stated in bits per weight and as a ratio, rounded so that it is always feasible.
    """
    numbers = math.ceil(smallest_bytes / ORIGINAL_BYTES_PER_NUMBER)  # budgets are granted in whole float32 numbers
    least_bits = math.ceil(BITS_PER_ORIGINAL * numbers / (rows * width) * 1000) / 1000
    max_ratio = math.floor(rows * width / numbers * 100) / 100
    return AECompressError(
        f"{budget} is infeasible for group {group!r} ({rows} x {width}) with {what}: the smallest stored form "
        f"takes {smallest_bytes} bytes; feasible budgets are {least_bits:.3f} <= bits per weight < {BITS_PER_ORIGINAL} "
        f"(feasible ratios are 1 < ratio <= {max_ratio:.2f})"
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
