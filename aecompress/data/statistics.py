"""Computing calibration statistics: input covariances of linear layers and Fisher row weights.

- ``covariance``: the uncentred second moment ``C = (1/T) Σ x xᵀ`` of the inputs ``x`` to
  a member's linear layer over ``T`` calibration tokens (float64, width x width). For
  GPT-2's fused ``c_attn`` the query, key and value parts share one input, hence one
  covariance. Embedding matrices have no input vector, so their covariance is ``None``.
- ``fisher``: per-row weights ``c_i = sqrt(Σ_batches Σ_j (∂loss/∂W_ij)²)``, an empirical
  Fisher information summed over each row (float64, rows).

Under DDP (``torch.distributed`` initialized) each rank runs its own share of the
covariance windows and the sums and token counts are all-reduced, so every rank ends with
the statistics of all windows. Fisher weights are computed whole on every rank.
Caching them is :mod:`aecompress.data.calibration`'s job.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from aecompress.core.errors import AECompressError
from aecompress.core.groups import Member, WeightGroup
from aecompress.core.progress import progress

MASK_PROBABILITY = 0.15


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _owner_name(member: Member) -> str:
    return member.param.rsplit(".", 1)[0] if "." in member.param else ""


def _batches(input_ids: torch.Tensor, size: int, desc: str):
    """The windows in batches of ``size``, with their progress shown (a long step on a large model)."""
    starts = range(0, input_ids.shape[0], size)
    for start in progress(starts, desc, "batch", show=distributed()[0] == 0):
        yield input_ids[start : start + size]


def _forward_module(model: nn.Module, owners: list[nn.Module]) -> nn.Module:
    """The transformer body if it contains every hooked layer, so no LM head logits are built."""
    base = getattr(model, "base_model", model)
    if base is model:
        return model
    inside = {id(m) for m in base.modules()}
    return base if all(id(o) in inside for o in owners) else model


COVARIANCE_BATCH = 4
"""Windows per forward pass for covariances; block by block runs the same batches, so its sums are the same."""


class InputMoments:
    """Running float64 sums of ``x xᵀ`` and token counts of the inputs of hooked linear layers.

    Shared by the whole-model pass and the block-by-block pass, so both add the same products in
    the same order and their covariances are bit-identical.
    """

    def __init__(self, owners: dict[str, nn.Module]):
        self.owners = owners
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles = [owner.register_forward_pre_hook(self._hook(name)) for name, owner in owners.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            self.sums[name] = self.sums[name] + x.T @ x if name in self.sums else x.T @ x
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

        return hook

    def remove(self) -> None:
        """Stop counting (the hooks are removed)."""
        for handle in self._handles:
            handle.remove()

    def means(self, groups: Sequence[WeightGroup]) -> dict[str, list[torch.Tensor | None]]:
        """Each group's per-member covariances; one clear line for a layer the windows never reached."""
        means = {name: self.sums[name] / self.counts[name] for name in self.sums}
        missing = sorted(set(self.owners) - set(means))
        if missing:
            raise AECompressError(f"calibration never reached layer {missing[0]!r}; is it used by the model's forward pass?")
        return {g.name: [means.get(_owner_name(m)) for m in g.members] for g in groups}


def linear_owners(model: nn.Module, groups: Sequence[WeightGroup]) -> dict[str, nn.Module]:
    """The linear layers whose inputs the groups' covariances are taken over, by name."""
    owners: dict[str, nn.Module] = {}
    for group in groups:
        for member in group.members:
            owner = model.get_submodule(_owner_name(member))
            if _is_linear(owner):
                owners[_owner_name(member)] = owner
    return owners


@torch.no_grad()
def covariances(
    model: nn.Module, groups: Sequence[WeightGroup], input_ids: torch.Tensor, batch_size: int
) -> dict[str, list[torch.Tensor | None]]:
    """One pass over the windows with a forward pre-hook on each member's layer."""
    owners = linear_owners(model, groups)
    moments = InputMoments(owners)
    runner = _forward_module(model, list(owners.values()))
    was_training = model.training
    model.eval()
    rank, world = distributed()
    try:
        if owners:
            for batch in _batches(input_ids[rank::world], batch_size, "covariance"):
                runner(batch)
    finally:
        moments.remove()
        model.train(was_training)
    if world > 1:
        _reduce(owners, moments.sums, moments.counts)
    return moments.means(groups)


def distributed() -> tuple[int, int]:
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


def fisher(
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
        for batch in _batches(input_ids, batch_size, "fisher"):
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
