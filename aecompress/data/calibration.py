"""Calibration statistics of weight groups, computed once and cached on disk.

Data-aware methods need to know how a weight matrix is used, not just what it holds.
:class:`Calibration` turns a calibration data spec into token windows once and hands out
the statistics each method ``needs`` (see :mod:`aecompress.data.statistics` for what they
are); :func:`collect` computes them, or reads them from the cache, per model, group,
calibration windows and settings, as safetensors files under ``cache_dir()/calibration``
(one file per group and kind). A cache file that cannot be read or does not match what it
should hold is reported with a warning and rebuilt. Nothing is unpickled. Under DDP rank 0
alone writes the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from aecompress.blocks.base import GroupStats
from aecompress.core.errors import AECompressError
from aecompress.core.groups import WeightGroup
from aecompress.data import statistics
from aecompress.data.specs import held_out, parse_spec
from aecompress.data.tokens import token_ids, windows
from aecompress.formats.packaged import cache_dir
from aecompress.formats.sources import max_positions, model_kind

log = logging.getLogger(__name__)

Kind = Literal["covariance", "fisher"]
LossKind = Literal["auto", "causal", "masked", "embedding"]
KINDS: tuple[str, ...] = ("covariance", "fisher")
LOSS_KINDS: tuple[str, ...] = ("auto", "causal", "masked", "embedding")
CACHE_VERSION = "1"
_FORMAT = "aecompress-calibration"


def loss_kind(model: nn.Module) -> str:
    """Which loss gives Fisher gradients for this model: ``causal``, ``masked`` or ``embedding``."""
    return {"causal_lm": "causal", "masked_lm": "masked", "encoder": "embedding"}[model_kind(model)]


def _cache_path(cache_key: str, group: WeightGroup, kind: str, input_ids: torch.Tensor, settings: dict) -> Path:
    digest = hashlib.sha256()
    for part in (CACHE_VERSION, cache_key, kind, json.dumps(group.to_dict(), sort_keys=True),
                 json.dumps(settings, sort_keys=True), str(tuple(input_ids.shape)), str(input_ids.dtype)):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(input_ids.contiguous().numpy().tobytes())
    return cache_dir() / "calibration" / f"{digest.hexdigest()}.safetensors"


def _save(path: Path, kind: str, values: list[torch.Tensor | None], tokens: int) -> None:
    tensors = {f"{kind}.{i}": v.contiguous() for i, v in enumerate(values) if v is not None}
    present = [i for i, v in enumerate(values) if v is not None]
    meta = {"format": _FORMAT, "version": CACHE_VERSION, "kind": kind, "tokens": str(tokens),
            "members": str(len(values)), "present": json.dumps(present)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    finally:
        tmp.unlink(missing_ok=True)


def _expected_shape(group: WeightGroup, kind: str, index: int, rows: list[int]) -> tuple[int, ...]:
    return (group.width, group.width) if kind == "covariance" else (rows[index],)


def _load(path: Path, group: WeightGroup, kind: str, rows: list[int], tokens: int) -> list[torch.Tensor | None] | None:
    """Cached values, or None (with a warning) if the file is missing pieces or unreadable."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != _FORMAT or meta.get("kind") != kind or meta.get("tokens") != str(tokens):
            raise ValueError("header does not describe this statistic")
        if int(meta.get("members", -1)) != len(group.members):
            raise ValueError("wrong number of members")
        present = set(json.loads(meta["present"]))
        tensors = load_file(path)
        values: list[torch.Tensor | None] = []
        for i in range(len(group.members)):
            value = tensors.get(f"{kind}.{i}")
            if i not in present:
                values.append(None)
                continue
            if value is None or tuple(value.shape) != _expected_shape(group, kind, i, rows):
                raise ValueError(f"entry {kind}.{i} is missing or has the wrong shape")
            if value.dtype != torch.float64 or not torch.isfinite(value).all():
                raise ValueError(f"entry {kind}.{i} is not finite float64")
            values.append(value)
        return values
    except Exception as err:  # noqa: BLE001 - any unreadable cache is rebuilt, never trusted
        warnings.warn(f"calibration cache {str(path)!r} is corrupt ({err}); rebuilding it", stacklevel=3)
        return None


def _check_inputs(model: nn.Module, input_ids: torch.Tensor, what: Sequence[str], loss: str, batch_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise AECompressError(f"calibration input_ids must be an integer tensor of shape (windows, length), got {shape}")
    if input_ids.numel() == 0:
        raise AECompressError("calibration input_ids are empty; give at least one token window")
    bad = [w for w in what if w not in KINDS]
    if bad or not what:
        raise AECompressError(f"unknown calibration statistic {bad[0] if bad else what!r}; valid: {', '.join(KINDS)}")
    if loss not in LOSS_KINDS:
        raise AECompressError(f"unknown calibration loss {loss!r}; valid: {', '.join(LOSS_KINDS)}")
    if batch_size < 1:
        raise AECompressError(f"calibration batch size must be at least 1, got {batch_size}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Embedding):
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= embeddings.num_embeddings:
            raise AECompressError(
                f"calibration token ids span {low}..{high}, but the model's vocabulary is 0..{embeddings.num_embeddings - 1}"
            )


def collect(
    model: nn.Module,
    groups: Sequence[WeightGroup],
    input_ids: torch.Tensor,
    what: Sequence[Kind] = ("covariance", "fisher"),
    cache_key: str | None = None,
    batch_size: int = statistics.COVARIANCE_BATCH,
    fisher_batch_size: int = 1,
    loss: LossKind = "auto",
    seed: int = 0,
    mask_token_id: int | None = None,
) -> dict[str, GroupStats]:
    """Compute (or read from the cache) calibration statistics for weight groups.

    Args:
        model: the loaded model, float32; it is left unchanged.
        groups: the weight groups to collect statistics for.
        input_ids: calibration token windows (windows x length), full-length, no padding.
        what: which statistics: ``covariance`` (inputs of each linear layer) and/or
            ``fisher`` (per-row weights from squared gradients of the loss).
        cache_key: identifies the model's weights (e.g. its resolved source and
            name). ``None`` disables the disk cache.
        batch_size: windows per forward pass for covariances.
        fisher_batch_size: windows per gradient for Fisher weights (1 = per-window
            empirical Fisher, as in FWSVD).
        loss: the Fisher loss; ``auto`` picks ``causal`` or ``masked`` from the
            model's head and ``embedding`` for a model without one.
        seed: seeds the masking and the embedding loss's random directions.
        mask_token_id: replaces masked positions for the masked loss; ``None``
            uses the config's ``mask_token_id`` if any, else random tokens.

    Returns:
        Group name -> :class:`GroupStats`.
    """
    what = (what,) if isinstance(what, str) else tuple(what)
    _check_inputs(model, input_ids, what, loss, min(batch_size, fisher_batch_size))
    input_ids = input_ids.detach().cpu().long()
    kind = loss_kind(model) if loss == "auto" else loss
    if mask_token_id is None:
        mask_token_id = getattr(getattr(model, "config", None), "mask_token_id", None)
    tokens = input_ids.numel()
    params = dict(model.named_parameters())
    rows = {g.name: [m.view(params[m.param]).shape[0] for m in g.members] for g in groups}
    settings = {
        "covariance": {},
        "fisher": {"loss": kind, "batch": fisher_batch_size, "seed": seed,
                   "mask": mask_token_id if kind == "masked" else None},
    }
    stats = {g.name: GroupStats(tokens=tokens, member_rows=rows[g.name]) for g in groups}
    for stat in dict.fromkeys(what):
        found: dict[str, list[torch.Tensor | None]] = {}
        paths = {}
        if cache_key is not None:
            for g in groups:
                paths[g.name] = _cache_path(cache_key, g, stat, input_ids, settings[stat])
                cached = _load(paths[g.name], g, stat, rows[g.name], tokens)
                if cached is not None:
                    found[g.name] = cached
        missing = [g for g in groups if g.name not in found]
        if missing:
            log.info("computing %s over %d calibration tokens for %d groups", stat, tokens, len(missing))
            if stat == "covariance":
                computed = statistics.covariances(model, missing, input_ids, batch_size)
            else:
                computed = statistics.fisher(model, missing, input_ids, fisher_batch_size, kind, seed, mask_token_id)
            for g in missing:
                if cache_key is not None and statistics.distributed()[0] == 0:  # under DDP rank 0 writes
                    _save(paths[g.name], stat, computed[g.name], tokens)
            found.update(computed)
        for g in groups:
            if stat == "covariance":
                stats[g.name].covariances = found[g.name]
            else:
                stats[g.name].fisher = found[g.name]  # type: ignore[assignment]
    return stats


SHARED_RUN = 64
"""Tokens in a row that calibration text may not share with test text. Real text shares no run this long unless it
is the same text (none between ``calibration``, ``wiki:calibration`` or ``wiki:validation`` and ``wiki:test``), and a
run this long is shared by nothing a split boundary cuts short."""


def apart_from_test(spec: str, ids: torch.Tensor, tokenizer) -> None:
    """Refuse calibration tokens that repeat held-out test text, by content: ``wiki:all[:2048]`` is test text
    whatever its split is called."""
    for other in held_out(spec):
        try:
            test = token_ids(other, tokenizer)
        except AECompressError:  # a local text too small to have a test split: nothing to keep apart from
            continue
        shared = shared_tokens(ids, test, SHARED_RUN)
        if shared:
            raise AECompressError(
                f"calibration data {spec!r} shares {shared} of its {ids.numel()} tokens with the test text "
                f"{other!r}; calibrate on text apart from it (e.g. calibration, wiki:calibration or PATH:calibration)")


def shared_tokens(ids: torch.Tensor, other: torch.Tensor, run: int) -> int:
    """How many tokens of ``ids`` lie in a run of ``run`` consecutive tokens that also occurs in ``other``.

    Each run is reduced to a 64-bit hash (random weights, products wrapping), so the check is a few vector ops.
    """
    if ids.numel() < run or other.numel() < run:
        return 0
    weights = torch.randint(-2**62, 2**62, (run,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    mine, theirs = ((t.long().unfold(0, run, 1) * weights).sum(1) for t in (ids, other))
    starts = torch.isin(mine, theirs).nonzero().flatten()
    edges = torch.zeros(ids.numel() + 1, dtype=torch.int64)
    edges.index_add_(0, starts, torch.ones_like(starts))
    edges.index_add_(0, starts + run, -torch.ones_like(starts))
    return int((edges.cumsum(0)[:-1] > 0).sum())


class Calibration:
    """Calibration text as token windows, and the statistics of weight groups over them, each made once.

    Args:
        model: the loaded model (float32); statistics leave it unchanged.
        tokenizer: its tokenizer.
        spec: the calibration data spec; a test split is refused.
        tokens: at most this many calibration tokens are used.
        window: tokens per window.
        cache_key: identifies the model's weights for the disk cache (its resolved source).
    """

    def __init__(self, model: nn.Module, tokenizer, spec: str, tokens: int, window: int, cache_key: str | None):
        if parse_spec(spec).is_test:
            raise AECompressError(
                f"calibration data {spec!r} is a test split; calibrate on other text (e.g. calibration or wiki:calibration)"
            )
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:  # -5 would slice ids[:-5]
            raise AECompressError(f"calibration_tokens {tokens!r} must be a positive number of tokens")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise AECompressError(f"calibration_window {window!r} must be a whole number of tokens, at least 2")
        limit = max_positions(model)
        if limit and window > limit:  # else a RuntimeError deep in the model's position embeddings
            raise AECompressError(f"calibration_window {window} is longer than the model's {limit} positions; "
                                  f"use 2..{limit}")
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.tokens, self.window, self.cache_key = tokens, window, cache_key
        self._windows: torch.Tensor | None = None
        self._stats: dict[tuple[str, str], GroupStats] = {}

    def windows(self) -> torch.Tensor:
        """The calibration windows ``[n, window]``, tokenized once."""
        if self._windows is None:
            ids = token_ids(self.spec, self.tokenizer)[: self.tokens]
            if ids.numel() < self.window:
                raise AECompressError(
                    f"calibration text {self.spec!r} has {ids.numel()} tokens (at most calibration_tokens), shorter "
                    f"than one calibration window of {self.window} tokens; use more text or a smaller calibration_window")
            apart_from_test(self.spec, ids, self.tokenizer)
            self._windows = windows(ids, self.window, self.window)
        return self._windows

    def stats(self, groups: Sequence[WeightGroup], kind: str) -> dict[str, GroupStats]:
        """One kind of statistics of these groups (kept in memory, and cached on disk)."""
        missing = [g for g in groups if (g.name, kind) not in self._stats]
        if missing:
            found = collect(self.model, missing, self.windows(), what=(kind,), cache_key=self.cache_key)
            for g in missing:
                self._stats[(g.name, kind)] = found[g.name]
        return {g.name: self._stats[(g.name, kind)] for g in groups}
