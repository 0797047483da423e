"""What a checkpoint must agree on with the config that reads it, and the one path that accepts it.

A checkpoint records its config's *signature* (ratio, loss, init, groups and the resolved
autoencoder specs). Resuming, validating, exporting or benchmarking with another config is
refused with the first difference named, by the same :func:`accept`, and weights are read
with ``weights_only=True``, so a checkpoint handed to us can never run code. Every checkpoint
is read by :func:`read`: ``export`` and the benchmark call it, and ``fit``/``validate
--ckpt_path`` reach it through :class:`SafeLoading`, so a 0-byte or truncated file is the same
one line everywhere.
"""

from __future__ import annotations

from typing import Protocol

import torch
from lightning.fabric.plugins import CheckpointIO

from aecompress.blocks.autoencoder_nets import AESpec
from aecompress.core.errors import AECompressError

SIGNATURE = "aecompress_signature"
DERIVED = {"latent", "decoder_hidden", "encoder_hidden"}
"""Spec fields solved from the settings and the budget, named last when a checkpoint differs."""


class Accepting(Protocol):
    """What a module offers the acceptance path (the compressor module does)."""

    def adopt_checkpoint_specs(self, checkpoint: dict) -> None: ...

    def signature(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> object: ...


def read(ckpt_path: str) -> dict:
    """A Lightning checkpoint read safely: tensors and plain data only, never code."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise AECompressError(f"checkpoint {ckpt_path!r} does not exist") from err
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's, said in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AECompressError(f"cannot read checkpoint {ckpt_path!r} safely: {first}") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise AECompressError(f"checkpoint {ckpt_path!r} has no state_dict; is it a Lightning checkpoint?")
    return checkpoint


class SafeLoading(CheckpointIO):
    """Lightning's checkpoint IO with every load going through :func:`read`; saving is left to the one it wraps.

    Lightning reads ``--ckpt_path`` itself; without this a damaged file surfaced as its
    ``EOFError`` or a zip error instead of one line naming the file.
    """

    def __init__(self, inner: CheckpointIO):
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read(str(path))

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def accept(module: Accepting, checkpoint: dict, ckpt_path: str | None) -> None:
    """Adopt the checkpoint's own choices (auto widths, refinement), then refuse it if it was made by another config.

    The one acceptance path: resume (``on_load_checkpoint``), export and the benchmark all use it.
    """
    module.adopt_checkpoint_specs(checkpoint)
    problems = []
    if SIGNATURE in checkpoint:
        problems = differences(normalized(checkpoint[SIGNATURE]), module.signature())
    problems = problems or state_problems(module.state_dict(), checkpoint.get("state_dict", {}))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AECompressError(f"checkpoint {ckpt_path!r} was written by another config: {problems[0]}{more}")


def load_weights(module: Accepting, ckpt_path: str) -> None:
    """Read a checkpoint safely, accept it for this module's config, and load its weights."""
    checkpoint = read(ckpt_path)
    accept(module, checkpoint, ckpt_path)
    module.load_state_dict(checkpoint["state_dict"])


def normalized(signature: dict) -> dict:
    """A saved signature with its specs read as today's :class:`AESpec` (fields added later take their defaults).

    A checkpoint from before a spec field existed (e.g. ``latent_storage``) then resumes
    as long as it agrees on everything it did record.
    """
    specs = signature.get("specs")
    if not isinstance(specs, dict):
        return signature
    try:
        return {**signature, "specs": {name: AESpec.from_dict(spec).to_dict() for name, spec in specs.items()}}
    except (AECompressError, KeyError, TypeError, ValueError):
        return signature  # let the comparison name the difference


def state_problems(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """How a checkpoint's state dict differs from the module's: shapes, missing and unexpected keys."""
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems = mismatched + [f"missing {k}" for k in sorted(set(own) - set(state))]
    return problems + [f"unexpected {k}" for k in sorted(set(state) - set(own))]


def differences(saved, current, path: str = "") -> list[str]:
    """Where two signatures differ, as ``path: checkpoint X, this config Y`` lines (first difference first)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = [f"{path}{k}: in this config only" for k in current if k not in saved]
        out += [f"{path}{k}: in the checkpoint only" for k in saved if k not in current]
        # Sizes follow from the settings: name a differing setting before the sizes it changed.
        for k in sorted(saved, key=lambda k: k in DERIVED):
            if k in current:
                out += differences(saved[k], current[k], f"{path}{k}.")
        return out
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)) and len(saved) == len(current):
        out = []
        for i, (a, b) in enumerate(zip(saved, current)):
            out += differences(a, b, f"{path}{i}.")
        return out
    if saved != current:
        return [f"{path.rstrip('.')}: checkpoint {_short(saved)}, this config {_short(current)}"]
    return []


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
