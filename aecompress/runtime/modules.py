"""Compact models at run time: weights decoded just in time, never held at full size.

:func:`to_runtime` swaps every compressed ``nn.Linear``, GPT-2 ``Conv1D`` and
``nn.Embedding`` of a transformers model for a stand-in that holds no weight:
it asks its method's *row source* (see :mod:`aecompress.core.rowsource`) for its rows
when it runs and drops them afterwards. A row source keeps only what the stored form
keeps, so the model lives in memory at its compressed size and trains in that form:
gradients reach every float stored tensor. The exception: integer (3- to 8-bit) latents
and factor codes are widened to float32 once at load, so they train like any parameter
(at 4 bytes per code).

Why stand-in modules and not ``torch.nn.utils.parametrize``: a parametrization
still forms the full weight on every call and hands it to the owner's
``forward``, so factorized forms could not run as two matmuls, an embedding
could not decode only the rows it looks up, and a fused ``c_attn`` would
rebuild its untouched parts each call. Parametrizations also keep their
``original`` per module, so one decoder shared by a concatenated group
would need the same indirection used here anyway.

Everything trainable lives once, under ``model.aecompress`` (a
:class:`RuntimeStore`): each group's shared modules (the decoder, or the
shared basis ``B``) and one row source per member. Stand-ins and sources only
*refer* to these, so ``parameters()`` and ``state_dict()`` hold each tensor
once, and a concatenated group's decoder is one object for all its layers.
Each method says how its form runs per layer (:func:`aecompress.methods.runtime_parts`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aecompress.blocks.int4_kernel import check_kernel
from aecompress.core.errors import AECompressError
from aecompress.core.rowsource import RowSource, refer
from aecompress.core.stored import StoredForm
from aecompress.methods import runtime_parts
from aecompress.runtime.cache import DecodeCache, make_cache

# --- stand-ins for the modules that owned the weights --------------------------------------------


class CompressedLinear(nn.Module):
    """Stands in for an ``nn.Linear`` or GPT-2 ``Conv1D`` whose weight rows are compressed.

    The output is split into ``parts`` equal column blocks (three for a fused
    ``c_attn``): a compressed part runs through its row source, an untouched
    part keeps its dense rows. ``Conv1D`` computes ``x @ W + b`` with ``W``
    stored transposed, which is ``F.linear`` over the rows, so both owners run
    the same way.
    """

    def __init__(self, parts: list[RowSource | torch.Tensor], bias: nn.Parameter | None, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(p.rows_count if isinstance(p, RowSource) else p.shape[0] for p in parts)
        self.bias = bias
        kinds = []
        for i, part in enumerate(parts):
            if isinstance(part, RowSource):
                kinds.append(part)
            else:
                self.register_parameter(f"dense{i}", nn.Parameter(part))
                kinds.append(f"dense{i}")
        refer(self, "parts", tuple(kinds))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for part in self.parts:
            dense = getattr(self, part) if isinstance(part, str) else None
            size = dense.shape[0] if dense is not None else part.rows_count
            bias = None if self.bias is None else (self.bias if len(self.parts) == 1 else self.bias[start : start + size])
            outs.append(F.linear(x, dense, bias) if dense is not None else part.apply(x, bias))
            start += size
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        kinds = ", ".join("dense" if isinstance(p, str) else type(p).__name__ for p in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, parts=[{kinds}]"


class CompressedEmbedding(nn.Module):
    """Stands in for an ``nn.Embedding``: looks up rows from its source (only those asked for, where it can).

    ``padding_idx`` is kept for reference only: the padding row's stored
    tensors (a latent, a row of ``A``) are not masked from gradients.
    """

    def __init__(self, source: RowSource, padding_idx: int | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = source.rows_count, source.width
        self.padding_idx = padding_idx
        refer(self, "source", source)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.source.lookup(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, source={type(self.source).__name__}"


class GroupRuntime(nn.Module):
    """One group's run-time state: shared modules (held once) and one row source per member."""

    def __init__(self, method: str, shared: list[nn.Module], members: list[RowSource]):
        super().__init__()
        self.method = method
        self.shared = nn.ModuleList(shared)
        self.members = nn.ModuleList(members)


class RuntimeStore(nn.Module):
    """Everything the compressed weights keep, attached to the model as ``model.aecompress``."""

    def __init__(self, groups: dict[str, GroupRuntime], cache: DecodeCache | None):
        super().__init__()
        self.groups = nn.ModuleDict({name.replace(".", "__"): g for name, g in groups.items()})
        refer(self, "cache", cache)


# --- swapping them in ----------------------------------------------------------------------------


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D":
        return "conv1d"
    return None


def _owners(model: nn.Module, param: nn.Parameter) -> list[tuple[str, nn.Module]]:
    """Every module (tied ones included) whose ``weight`` is this parameter."""
    return [(n, m) for n, m in model.named_modules(remove_duplicate=False) if m._parameters.get("weight") is param]


def _stand_in(group: str, name: str, module: nn.Module, member, parts: dict[int, RowSource]) -> nn.Module:
    kind = _kind(module)
    if kind is None or (kind == "conv1d") != member.transposed:
        raise AECompressError(
            f"group {group!r}: {name!r} is a {type(module).__name__}, which cannot run compressed "
            "(run-time modules: nn.Linear, Conv1D, nn.Embedding); load it with materialize=True instead"
        )
    if kind == "embedding":
        if member.parts != 1 or module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise AECompressError(
                f"group {group!r}: embedding {name!r} uses options the run-time form does not support "
                "(fused parts, max_norm, scale_grad_by_freq or sparse); load it with materialize=True instead"
            )
        return CompressedEmbedding(parts[0], module.padding_idx)
    linear = module.weight.t() if member.transposed else module.weight
    size = linear.shape[0] // member.parts
    pieces = [parts.get(p, linear[p * size : (p + 1) * size].detach().clone()) for p in range(member.parts)]
    return CompressedLinear(pieces, module.bias, linear.shape[1])


def to_runtime(model: nn.Module, forms: Sequence[StoredForm], cache: bool | int = False,
               kernel: str = "float32") -> nn.Module:
    """Replace the compressed weights of ``model`` by modules that decode them when they run.

    Args:
        model: the transformers model the forms were made from (weights of
            untouched parameters already loaded); changed in place.
        forms: the stored form of every compressed group.
        cache: keep decoded matrices between calls (only while nothing needs
            their gradient): ``False`` (the default) decodes on every call,
            ``True`` keeps all of them, an integer keeps at most that many bytes.
        kernel: ``float32`` (the default here) decodes and multiplies exactly; ``int4`` multiplies
            generation-sized inputs of grid codes up to 4 bits through torch's fused kernel, in
            bfloat16 (see :mod:`aecompress.blocks.int4_kernel`).

    Returns:
        The same model, its compressed weights held as in their stored forms.

    Raises:
        AECompressError: naming the group, if a form's method or an owning
            module has no run-time form.
    """
    forms = list(forms)
    check_kernel(kernel)
    decode_cache = make_cache(cache)
    params = dict(model.named_parameters())
    for form in forms:
        missing = [m.param for m in form.group.members if m.param not in params]
        if missing:
            raise AECompressError(f"group {form.group.name!r} names {missing[0]!r}, which this model does not have")
    groups: dict[str, GroupRuntime] = {}
    by_param: dict[str, tuple[str, object, dict[int, RowSource]]] = {}
    for form in forms:
        member_rows = [m.view(params[m.param]).shape[0] for m in form.group.members]
        shared, sources = runtime_parts(form, member_rows)
        for member, source in zip(form.group.members, sources):
            refer(source, "cache", decode_cache)
            source.kernel = kernel
            by_param.setdefault(member.param, (form.group.name, member, {}))[2][member.part] = source
        groups[form.group.name] = GroupRuntime(form.method, shared, sources)
    # Plan every swap before changing anything, so a refusal leaves the model as it was.
    plan: list[tuple[str, nn.Module]] = []
    for param_name, (group, member, parts) in by_param.items():
        owners = _owners(model, params[param_name])
        if not owners:
            raise AECompressError(f"group {group!r}: {param_name!r} is not the weight of a module; load it with materialize=True")
        made: dict[int, nn.Module] = {}
        for name, module in owners:
            if id(module) not in made:
                made[id(module)] = _stand_in(group, name, module, member, parts)
            plan.append((name, made[id(module)]))
    for name, stand_in in plan:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, stand_in)
    model.add_module("aecompress", RuntimeStore(groups, decode_cache))
    return model
