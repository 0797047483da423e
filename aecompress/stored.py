"""The stored form: one interface for every compressor.

A compressor turns a weight group into a :class:`StoredForm` — named tensors
plus JSON metadata — and registers a decode function for its method name.
Export, ``load_compact``, evaluation and the budget accountant only ever see
stored forms, so they never need to know which method made one. Decoders are
looked up in a fixed registry; nothing is imported by name from an artifact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from aecompress.autoencoder import AESpec, apply_decoder, build_decoder
from aecompress.budget import original_bytes, stored_bytes, stored_numbers
from aecompress.errors import AECompressError
from aecompress.groups import WeightGroup
from aecompress.rowquant import stored_values


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


Decoder = Callable[[StoredForm], torch.Tensor]
DECODERS: dict[str, Decoder] = {}


def register(method: str) -> Callable[[Decoder], Decoder]:
    """Register the decode function of a compression method."""

    def wrap(fn: Decoder) -> Decoder:
        DECODERS[method] = fn
        return fn

    return wrap


def decode(stored: StoredForm) -> torch.Tensor:
    """Decode a stored form to its (rows x width) float32 matrix."""
    if stored.method not in DECODERS:
        raise AECompressError(f"unknown compression method {stored.method!r}; valid: {', '.join(sorted(DECODERS))}")
    # Decode from fresh contiguous copies: CPU matmul kernels can round differently on
    # memory that is not 64-byte aligned (tensors read from a safetensors file often
    # are not), and a form must decode to the same bits wherever its tensors live.
    fresh = {k: t.clone(memory_format=torch.contiguous_format) for k, t in stored.tensors.items()}
    rows = DECODERS[stored.method](StoredForm(stored.method, stored.group, fresh, stored.meta))
    expected = (stored.group.rows, stored.group.width)
    if tuple(rows.shape) != expected:
        raise AECompressError(f"group {stored.group.name!r} decodes to {tuple(rows.shape)}, expected {expected}")
    return rows


@register("ae")
@torch.no_grad()
def decode_autoencoder(stored: StoredForm) -> torch.Tensor:
    """Run the stored decoder over the stored latents (CPU, float32, deterministic)."""
    spec = AESpec.from_dict(stored.meta["spec"])
    decoder = build_decoder(spec)
    prefix = "decoder."
    # Stored in spec.dtype; decoding always runs in float32 from exactly those values.
    state = {k[len(prefix) :]: v.float() for k, v in stored.tensors.items() if k.startswith(prefix)}
    try:
        decoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise AECompressError(f"group {stored.group.name!r}: stored decoder does not match its spec: {err}") from err
    norms = stored.tensors.get("norms") if spec.enforce_norm else None
    return apply_decoder(decoder.float().eval(), stored_values(stored.tensors, "latents", spec.latent), norms)


# The baselines register their decoders on import; importing them here means any
# reader of stored forms (export, load_compact) can decode every method.
from aecompress import baselines as _baselines  # noqa: E402,F401  (after register: baselines imports it)
