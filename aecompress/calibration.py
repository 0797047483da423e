"""Calibration statistics: input covariances and Fisher row weights, cached on disk.

Data-aware baselines need to know how a weight matrix is used, not just what
it holds. This module runs a model over calibration token windows and keeps,
for every member of every requested weight group:

- ``covariance``: the uncentred second moment ``C = (1/T) Σ x xᵀ`` of the
  inputs ``x`` to the member's linear layer over ``T`` calibration tokens
  (float64, width x width). For GPT-2's fused ``c_attn`` the query, key and
  value parts share one input, hence one covariance. Embedding matrices have no
  input vector, so their covariance is ``None``.
- ``fisher``: per-row weights ``c_i = sqrt(Σ_batches Σ_j (∂loss/∂W_ij)²)``,
  an empirical Fisher information summed over each row (float64, rows).

Statistics are computed once per model, group, calibration windows and
settings, then cached as safetensors files under
``cache_dir()/calibration`` (one file per group and kind). A cache file that
cannot be read or does not match what it should hold is reported with a
warning and rebuilt. Nothing is unpickled.

Under DDP (``torch.distributed`` initialized) each rank runs its own share of
the covariance windows and the sums and token counts are all-reduced, so every
rank ends with the statistics of all windows; rank 0 alone writes the cache.
Fisher weights are computed whole on every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from aecompress.errors import AECompressError
from aecompress.groups import Member, WeightGroup
from aecompress.loading import cache_dir

log = logging.getLogger(__name__)

Kind = Literal["covariance", "fisher"]
LossKind = Literal["auto", "causal", "masked", "embedding"]
KINDS: tuple[str, ...] = ("covariance", "fisher")
LOSS_KINDS: tuple[str, ...] = ("auto", "causal", "masked", "embedding")
CACHE_VERSION = "1"
_FORMAT = "aecompress-calibration"
MASK_PROBABILITY = 0.15


@dataclass
class GroupStats:
    """Calibration statistics of one weight group, aligned with ``group.members``.

    Attributes:
        tokens: calibration tokens the statistics were computed over.
        covariances: per member, the (width x width) float64 second moment of
            its inputs per token, or ``None`` for a member with no linear input
            (an embedding); ``None`` if covariances were not collected.
        fisher: per member, the float64 Fisher row weights (one per row);
            ``None`` if they were not collected.
        member_rows: rows of each member matrix, in group order.
    """

    tokens: int
    covariances: list[torch.Tensor | None] | None = None
    fisher: list[torch.Tensor] | None = None
    member_rows: list[int] | None = None

    def mean_covariance(self) -> torch.Tensor | None:
        """The members' covariances averaged, or None if any member has none."""
        if not self.covariances or any(c is None for c in self.covariances):
            return None
        return torch.stack(self.covariances).mean(dim=0)

    def row_weights(self) -> torch.Tensor | None:
        """All members' Fisher row weights, stacked in group row order."""
        return None if self.fisher is None else torch.cat(list(self.fisher))


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _owner_name(member: Member) -> str:
    return member.param.rsplit(".", 1)[0] if "." in member.param else ""


def loss_kind(model: nn.Module) -> str:
    """Which loss gives Fisher gradients for this model: ``causal``, ``masked`` or ``embedding``."""
    from aecompress.evaluate import model_kind  # imported here: evaluate depends on this package's core

    return {"causal_lm": "causal", "masked_lm": "masked", "encoder": "embedding"}[model_kind(model)]


def _batches(input_ids: torch.Tensor, size: int):
    for start in range(0, input_ids.shape[0], size):
        yield input_ids[start : start + size]


def _forward_module(model: nn.Module, owners: list[nn.Module]) -> nn.Module:
    """The transformer body if it contains every hooked layer, so no LM head logits are built."""
    base = getattr(model, "base_model", model)
    if base is model:
        return model
    inside = {id(m) for m in base.modules()}
    return base if all(id(o) in inside for o in owners) else model


@torch.no_grad()
def _covariances(
    model: nn.Module, groups: Sequence[WeightGroup], input_ids: torch.Tensor, batch_size: int
) -> dict[str, list[torch.Tensor | None]]:
    """One pass over the windows with a forward pre-hook on each member's layer."""
    owners: dict[str, nn.Module] = {}
    for group in groups:
        for member in group.members:
            owner = model.get_submodule(_owner_name(member))
            if _is_linear(owner):
                owners[_owner_name(member)] = owner
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [owner.register_forward_pre_hook(hook_for(name)) for name, owner in owners.items()]
    runner = _forward_module(model, list(owners.values()))
    was_training = model.training
    model.eval()
    rank, world = _distributed()
    try:
        if owners:
            for batch in _batches(input_ids[rank::world], batch_size):
                runner(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if world > 1:
        _reduce(owners, sums, counts)
    means = {name: sums[name] / counts[name] for name in sums}
    missing = sorted(set(owners) - set(means))
    if missing:
        raise AECompressError(f"calibration never reached layer {missing[0]!r}; is it used by the model's forward pass?")
    return {g.name: [means.get(_owner_name(m)) for m in g.members] for g in groups}


def _distributed() -> tuple[int, int]:
    """This process's rank and the world size while torch.distributed runs (DDP), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _reduce(owners: dict[str, nn.Module], sums: dict[str, torch.Tensor], counts: dict[str, int]) -> None:
    """Sum the ranks' input second moments and token counts: each rank saw its own windows."""
    import torch.distributed as dist

    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    for name in sorted(owners):
        owner = owners[name]
        width = owner.in_features if isinstance(owner, nn.Linear) else owner.weight.shape[0]
        total = sums.get(name, torch.zeros(width, width, dtype=torch.float64)).to(device)
        count = torch.tensor([counts.get(name, 0)], dtype=torch.int64, device=device)
        dist.all_reduce(total)
        dist.all_reduce(count)
        if int(count.item()):
            sums[name], counts[name] = total.cpu(), int(count.item())


def _fisher_loss(
    model: nn.Module, batch: torch.Tensor, kind: str, gen: torch.Generator, mask_token_id: int | None, vocab: int
) -> torch.Tensor:
    if kind == "causal":
        return model(input_ids=batch, labels=batch).loss
    if kind == "masked":
        chosen = torch.rand(batch.shape, generator=gen) < MASK_PROBABILITY
        chosen[torch.arange(batch.shape[0]), torch.randint(batch.shape[1], (batch.shape[0],), generator=gen)] = True
        labels = torch.where(chosen, batch, torch.full_like(batch, -100))
        filler = (
            torch.full_like(batch, mask_token_id)
            if mask_token_id is not None
            else torch.randint(vocab, batch.shape, generator=gen)
        )
        return model(input_ids=torch.where(chosen, filler, batch), labels=labels).loss
    out = model(batch)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0] if isinstance(out, (tuple, list)) else out
    pooled = hidden.float().mean(dim=1)
    direction = torch.randn(pooled.shape, generator=gen)
    return (direction * pooled).sum()


def _fisher(
    model: nn.Module,
    groups: Sequence[WeightGroup],
    input_ids: torch.Tensor,
    batch_size: int,
    kind: str,
    seed: int,
    mask_token_id: int | None,
) -> dict[str, list[torch.Tensor]]:
    """Squared gradients of the loss, summed per row over all batches.

    For a model with an LM head the loss is its causal or masked LM loss on the
    windows (15 % of positions masked with a fixed seed; with no mask token id,
    masked positions get random tokens). For a bare encoder (``BertModel``, a
    sentence embedder) there are no labels: the model is read as a Gaussian
    likelihood ``N(pooled(x), I)`` around its mean-pooled embedding, whose
    Fisher is ``E[Jᵀ J]``. Its score for a sampled output is ``εᵀ J`` with
    ``ε ~ N(0, I)``, so squared gradients of ``⟨ε, pooled⟩`` with a fixed-seed
    ``ε`` per batch are an unbiased Monte-Carlo estimate of that Fisher.
    """
    params = dict(model.named_parameters())
    needed = {m.param for g in groups for m in g.members}
    flags = {name: p.requires_grad for name, p in params.items()}
    sums = {g.name: [torch.zeros(m.view(params[m.param]).shape[0], dtype=torch.float64) for m in g.members]
            for g in groups}
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = embeddings.num_embeddings if isinstance(embeddings, nn.Embedding) else int(input_ids.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    unused: set[str] = set()
    model.eval()
    try:
        for name, p in params.items():
            p.requires_grad_(name in needed)
        for batch in _batches(input_ids, batch_size):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                _fisher_loss(model, batch, kind, gen, mask_token_id, vocab).backward()
            for group in groups:
                for i, member in enumerate(group.members):
                    grad = params[member.param].grad
                    if grad is None:
                        unused.add(member.param)
                        continue
                    sums[group.name][i] += member.view(grad).double().pow(2).sum(dim=1)
    finally:
        model.zero_grad(set_to_none=True)
        for name, p in params.items():
            p.requires_grad_(flags[name])
        model.train(was_training)
    if unused:
        warnings.warn(f"the calibration loss does not depend on {sorted(unused)[0]}; its Fisher weights are zero",
                      stacklevel=3)
    return {name: [s.sqrt() for s in rows] for name, rows in sums.items()}


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
    batch_size: int = 4,
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
                computed = _covariances(model, missing, input_ids, batch_size)
            else:
                computed = _fisher(model, missing, input_ids, fisher_batch_size, kind, seed, mask_token_id)
            for g in missing:
                if cache_key is not None and _distributed()[0] == 0:  # under DDP rank 0 writes
                    _save(paths[g.name], stat, computed[g.name], tokens)
            found.update(computed)
        for g in groups:
            if stat == "covariance":
                stats[g.name].covariances = found[g.name]
            else:
                stats[g.name].fisher = found[g.name]  # type: ignore[assignment]
    return stats
