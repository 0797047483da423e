"""The stored form: what every compression method keeps for one weight group.

A method turns a weight group into a :class:`StoredForm` (named tensors plus JSON
metadata). Its size is counted by the one accountant (:mod:`aecompress.core.budget`)
from the tensors alone, so export, evaluation and the benchmark never need to know
which method made a form; decoding it is the method table's job
(:func:`aecompress.methods.decode`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aecompress.core.budget import original_bytes, stored_bytes, stored_numbers
from aecompress.core.groups import WeightGroup


@dataclass
class StoredForm:
    """What one compressor keeps for one weight group."""

    method: str
    group: WeightGroup
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def numbers(self) -> int:
        """Stored numbers, counted by the one accountant."""
        return stored_numbers(self.tensors)

    @property
    def bytes(self) -> int:
        """Stored bytes, counted by the one accountant."""
        return stored_bytes(self.tensors)

    @property
    def ratio(self) -> float:
        """Achieved compression ratio: original float32 bytes over stored bytes."""
        return original_bytes(self.group.rows, self.group.width) / self.bytes
