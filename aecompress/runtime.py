"""Compact models at run time: weights decoded just in time, never held at full size.

:func:`to_runtime` swaps every compressed ``nn.Linear``, GPT-2 ``Conv1D`` and
``nn.Embedding`` of a transformers model for a stand-in that holds no weight:
it asks a *row source* for its rows when it runs and drops them afterwards.
A row source keeps only what the stored form keeps (latents, norms and a
reference to the group's decoder; two factors; kept values and their
positions; packed codes and scales), so the model lives in memory at its
compressed size and trains in that form: gradients reach every float stored
tensor. The exception: integer (3- to 8-bit) latents and factor codes are widened to float32
once at load, so they train like any parameter (at 4 bytes per code).

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

Each compression method says how its stored form runs per layer by
registering a builder in :data:`RUNTIME`, parallel to
:data:`aecompress.stored.DECODERS`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from aecompress.autoencoder import NORM_EPS, AESpec, ResidualDecoder, apply_decoder, build_decoder
from aecompress.baselines import index_dtype, pack_bits, unpack_bits
from aecompress.errors import AECompressError
from aecompress.rowquant import SCALES_SUFFIX, stored_values
from aecompress.stored import StoredForm

# --- the decode cache ----------------------------------------------------------------------------


class DecodeCache:
    """Decoded rows kept between calls, least recently used first out.

    Off by default. An entry is reused only while none of the tensors it was
    decoded from has changed (same storage, same version counter), and never
    while gradients must flow into them, so training always decodes afresh.
    """

    def __init__(self, max_bytes: int | None):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[nn.Module, tuple[tuple, torch.Tensor]] = OrderedDict()

    @property
    def bytes(self) -> int:
        """Bytes held by cached rows now."""
        return sum(t.numel() * t.element_size() for _, t in self.entries.values())

    def get(self, owner: nn.Module, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached rows of ``owner`` for ``key``, decoding them on a miss."""
        hit = self.entries.get(owner)
        if hit is not None and hit[0] == key:
            self.entries.move_to_end(owner)
            return hit[1]
        rows = make()
        size = rows.numel() * rows.element_size()
        self.entries.pop(owner, None)
        if self.max_bytes is not None and size > self.max_bytes:
            return rows
        self.entries[owner] = (key, rows)
        while self.max_bytes is not None and self.bytes > self.max_bytes:
            self.entries.popitem(last=False)
        return rows

    def clear(self) -> None:
        """Drop every cached matrix."""
        self.entries.clear()


def _refer(module: nn.Module, name: str, value) -> None:
    """Keep a reference without registering it, so shared modules are owned once."""
    object.__setattr__(module, name, value)


# --- row sources: one member's rows, from its stored form ----------------------------------------


class RowSource(nn.Module):
    """One member's (rows x width) matrix, in ``nn.Linear`` layout, decoded on demand."""

    def __init__(self, rows: int, width: int):
        super().__init__()
        self.rows_count, self.width = rows, width
        _refer(self, "cache", None)

    def shared(self) -> list[nn.Module]:
        """Modules this source reads but does not own (a group's decoder or basis)."""
        return []

    def decode(self) -> torch.Tensor:
        """The rows in float32, differentiable in the stored tensors."""
        raise NotImplementedError

    def _frozen(self) -> bool:
        tensors = [*self.parameters(), *(p for m in self.shared() for p in m.parameters())]
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

    def rows(self) -> torch.Tensor:
        """The decoded rows, from the cache when one is on and nothing has changed."""
        if self.cache is None or not self._frozen():
            return self.decode()
        tensors = [*self.parameters(), *self.buffers(), *(t for m in self.shared() for t in m.parameters())]
        key = (torch.is_inference_mode_enabled(), *((t.data_ptr(), t._version) for t in tensors))
        return self.cache.get(self, key, self.decode)

    def cached(self) -> torch.Tensor | None:
        """The rows if the cache holds an entry for this source (refreshed if stale), else None."""
        if self.cache is None or self not in self.cache.entries or not self._frozen():
            return None
        return self.rows()

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ rowsᵀ + bias``: what an ``nn.Linear`` with these rows computes."""
        return F.linear(x, self.rows().to(x.dtype), bias)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows at ``ids``: what an ``nn.Embedding`` with these rows returns."""
        return F.embedding(ids, self.rows())

    def extra_repr(self) -> str:
        return f"rows={self.rows_count}, width={self.width}"


class AERows(RowSource):
    """Latents and norms of one member, decoded by its group's shared decoder.

    When the decoder ends in a linear layer (``linear`` and ``residual``
    decoders, ``mlp`` without an output activation), the rows are a
    factorization ``W = H' W3'ᵀ`` with ``H' = [hidden(latents), 1]`` and
    ``W3' = [W3, b3]``; if that rank is below the dense cost, :meth:`apply`
    runs it as two matmuls and takes the norm rescaling from the small Gram
    matrix ``W3'ᵀ W3'``, never forming ``W``. The seed's ``tanh`` output
    needs the full decode.
    """

    def __init__(self, latents: torch.Tensor, norms: torch.Tensor | None, decoder: nn.Module, width: int):
        super().__init__(latents.shape[0], width)
        self.latents = nn.Parameter(latents)
        self.norms = None if norms is None else nn.Parameter(norms)
        _refer(self, "decoder", decoder)
        rank = _factor_rank(decoder)
        self.factored = rank is not None and (rank + 1) * (self.rows_count + width) < self.rows_count * width

    def shared(self) -> list[nn.Module]:
        return [self.decoder]

    def decode(self) -> torch.Tensor:
        if self._frozen() and isinstance(self.decoder, nn.Sequential):
            return _decode_in_place(self.decoder, self.latents, self.norms)
        return apply_decoder(self.decoder, self.latents, self.norms)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.factored or self.cached() is not None:
            return super().apply(x, bias)
        hidden, out = _factor_parts(self.decoder, self.latents)
        y = F.linear(F.linear(x, out.t().to(x.dtype)), hidden.to(x.dtype))
        if self.norms is not None:
            squared = ((hidden @ (out.t() @ out)) * hidden).sum(dim=1)
            y = y * (self.norms.float() / squared.clamp_min(NORM_EPS**2).sqrt()).to(x.dtype)
        return y if bias is None else y + bias

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Decode only the distinct rows looked up, not the whole table."""
        cached = self.cached()
        if cached is not None:
            return F.embedding(ids, cached).to(self.latents.dtype)
        unique, inverse = torch.unique(ids, return_inverse=True)
        norms = None if self.norms is None else self.norms[unique]
        rows = apply_decoder(self.decoder, self.latents[unique], norms)
        return rows[inverse].to(self.latents.dtype)


def _factor_rank(decoder: nn.Module) -> int | None:
    """The inner size of a decoder's rows as a factorization, or None if its output is non-linear."""
    if isinstance(decoder, ResidualDecoder):
        return decoder.linear.in_features + decoder.branch[2].in_features
    if isinstance(decoder, nn.Sequential) and isinstance(decoder[-1], nn.Linear):
        return decoder[-1].in_features
    return None


def _factor_parts(decoder: nn.Module, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``H'`` (rows x r+1) and ``W3'`` (width x r+1) with decoded rows ``= H' W3'ᵀ`` (float32)."""
    if isinstance(decoder, ResidualDecoder):
        hidden = torch.cat([latents, decoder.branch[1](decoder.branch[0](latents))], dim=1)
        out = torch.cat([decoder.linear.weight, decoder.branch[2].weight], dim=1)
        bias = decoder.linear.bias + decoder.branch[2].bias
    else:
        hidden = decoder[:-1](latents)
        out, bias = decoder[-1].weight, decoder[-1].bias
    ones = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
    return torch.cat([hidden, ones], dim=1).float(), torch.cat([out, bias.unsqueeze(1)], dim=1).float()


def _decode_in_place(decoder: nn.Sequential, latents: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """:func:`apply_decoder` with no gradient to keep: the same kernels, one row-sized buffer.

    Each activation and the norm rescaling overwrite the last layer's output
    instead of allocating a new matrix, which is most of the cost of a decode.
    """
    out = latents
    for layer in decoder:
        if isinstance(layer, nn.Linear):
            out = F.linear(out, layer.weight, layer.bias)
        elif isinstance(layer, nn.LeakyReLU):
            out = F.leaky_relu_(out, layer.negative_slope)
        elif isinstance(layer, nn.Tanh):
            out = out.tanh_()
        else:
            out = layer(out)
    out = out.float()
    if norms is None:
        return out
    scale = norms.float() / out.norm(dim=1).clamp_min(NORM_EPS)
    return out.mul_(scale.unsqueeze(1))


class Basis(nn.Module):
    """The right factor ``B`` (rank x width), shared by a group or owned by one member."""

    def __init__(self, b: torch.Tensor):
        super().__init__()
        self.B = nn.Parameter(b)


class FactorRows(RowSource):
    """``A`` (rows x rank) of one member and a basis ``B``: applied as two matmuls."""

    def __init__(self, a: torch.Tensor, basis: Basis):
        super().__init__(a.shape[0], basis.B.shape[1])
        self.A = nn.Parameter(a)
        _refer(self, "basis", basis)

    def shared(self) -> list[nn.Module]:
        return [self.basis]

    def decode(self) -> torch.Tensor:
        return self.A.float() @ self.basis.B.float()

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``(x @ Bᵀ) @ Aᵀ``: r·(in + out) multiply-adds per token instead of in·out."""
        return F.linear(F.linear(x, self.basis.B.to(x.dtype)), self.A.to(x.dtype), bias)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.A) @ self.basis.B.to(self.A.dtype)


class PrunedRows(RowSource):
    """Kept values (trainable) and their positions, scattered into a zero matrix."""

    def __init__(self, rows: int, width: int, values: torch.Tensor, positions: dict[str, torch.Tensor]):
        super().__init__(rows, width)
        self.values = nn.Parameter(values)
        self.encoding = "mask" if "mask" in positions else "index" if "index" in positions else "row_index"
        for name, tensor in positions.items():
            self.register_buffer(name, tensor)

    def positions(self) -> torch.Tensor:
        """Flat positions of the kept values, ascending."""
        m, n = self.rows_count, self.width
        if self.encoding == "mask":
            return unpack_bits(self.mask, m * n).bool().nonzero().flatten()
        if self.encoding == "index":
            return self.index.long()
        rows = torch.repeat_interleave(torch.arange(m, device=self.counts.device), self.counts.long())
        return rows * n + self.columns.long()

    def decode(self) -> torch.Tensor:
        m, n = self.rows_count, self.width
        out = torch.zeros(m * n, dtype=torch.float32, device=self.values.device)
        return out.index_put((self.positions(),), self.values.float()).view(m, n)


class QuantizedRows(RowSource):
    """Packed k-bit codes with per-row scale and zero point (both trainable)."""

    def __init__(self, rows: int, width: int, bits: int, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        super().__init__(rows, width)
        self.bits = bits
        self.register_buffer("codes", codes)
        self.scale = nn.Parameter(scale)
        self.zero = nn.Parameter(zero)

    def decode(self) -> torch.Tensor:
        m, n, bits = self.rows_count, self.width, self.bits
        weights = torch.arange(bits, dtype=torch.int32, device=self.codes.device)
        stream = unpack_bits(self.codes, m * n * bits).view(m * n, bits).to(torch.int32)
        codes = (stream << weights).sum(dim=1).view(m, n).float()
        return self.zero.float().unsqueeze(1) + self.scale.float().unsqueeze(1) * codes


# --- how each method's stored form runs per layer ------------------------------------------------

Built = tuple[list[nn.Module], list[RowSource]]
Builder = Callable[[StoredForm, list[int]], Built]
RUNTIME: dict[str, Builder] = {}


def register_runtime(method: str) -> Callable[[Builder], Builder]:
    """Register how a method's stored form is split into per-member row sources."""

    def wrap(fn: Builder) -> Builder:
        RUNTIME[method] = fn
        return fn

    return wrap


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out


@register_runtime("ae")
def build_autoencoder(form: StoredForm, member_rows: list[int]) -> Built:
    """One decoder for the group; each member keeps its own latents and norms."""
    spec = AESpec.from_dict(form.meta["spec"])
    decoder = build_decoder(spec)
    state = {k.removeprefix("decoder."): v for k, v in form.tensors.items() if k.startswith("decoder.")}
    try:
        decoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise AECompressError(f"group {form.group.name!r}: stored decoder does not match its spec: {err}") from err
    latents = _codes(form.tensors, "latents", spec.latent).split(member_rows)
    norms = form.tensors["norms"].split(member_rows) if spec.enforce_norm else [None] * len(member_rows)
    sources = [AERows(lat.clone(), None if nrm is None else nrm.clone(), decoder, spec.width)
               for lat, nrm in zip(latents, norms)]
    return [decoder.eval()], list(sources)


@register_runtime("svd")
@register_runtime("fwsvd")
@register_runtime("whitened_svd")
def build_factors(form: StoredForm, member_rows: list[int]) -> Built:
    """A shared basis ``B`` with per-member slices of ``A``, or per-member ``A.i``, ``B.i``."""
    t = form.tensors
    if "A" in t:
        basis = Basis(t["B"].clone())
        return [basis], [FactorRows(a.clone(), basis) for a in _codes(t, "A", t["B"].shape[0]).split(member_rows)]
    count = len(form.meta["ranks"])
    if count != len(member_rows):
        raise AECompressError(
            f"group {form.group.name!r} stores {count} factor pairs for {len(member_rows)} matrices; it cannot run per layer"
        )
    bases = [Basis(t[f"B.{i}"].clone()) for i in range(count)]
    return bases, [FactorRows(_codes(t, f"A.{i}", t[f"B.{i}"].shape[0]).clone(), b) for i, b in enumerate(bases)]


def _codes(tensors: dict[str, torch.Tensor], key: str, columns: int) -> torch.Tensor:
    """Stored codes as they run: integer codes are widened once to float32 here, not per forward pass."""
    return stored_values(tensors, key, columns) if key + SCALES_SUFFIX in tensors else tensors[key]


def _bit_slice(packed: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Bits ``start .. start+count`` of a :func:`pack_bits` stream, packed on their own."""
    first, last = start // 8, (start + count + 7) // 8
    if start % 8 == 0:
        return packed[first:last].clone()
    bits = unpack_bits(packed[first:last], (last - first) * 8)
    return pack_bits(bits[start % 8 : start % 8 + count])


@register_runtime("prune")
def build_prune(form: StoredForm, member_rows: list[int]) -> Built:
    """Each member keeps its slice of the kept values and its positions, in the group's encoding."""
    t, n = form.tensors, form.group.width
    sources = []
    kept_before = 0
    for r0, m in zip(_offsets(member_rows), member_rows):
        if "mask" in t:
            mask = _bit_slice(t["mask"], r0 * n, m * n)
            kept = int(unpack_bits(mask, m * n).sum())
            positions = {"mask": mask}
        elif "index" in t:
            flat = t["index"].long()
            lo, hi = (int(torch.searchsorted(flat, v)) for v in (r0 * n, (r0 + m) * n))
            kept_before, kept = lo, hi - lo
            positions = {"index": (flat[lo:hi] - r0 * n).to(index_dtype(m * n - 1))}
        else:
            counts = t["counts"][r0 : r0 + m].clone()
            kept = int(counts.long().sum())
            positions = {"columns": t["columns"][kept_before : kept_before + kept].clone(), "counts": counts}
        values = t["values"][kept_before : kept_before + kept].clone()
        sources.append(PrunedRows(m, n, values, positions))
        kept_before += kept
    if kept_before != t["values"].numel():
        raise AECompressError(f"group {form.group.name!r}: pruned positions do not match the stored values")
    return [], sources


@register_runtime("quantize")
def build_quantize(form: StoredForm, member_rows: list[int]) -> Built:
    """Each member keeps its rows' packed codes, scales and zero points."""
    t, n, bits = form.tensors, form.group.width, int(form.meta["bits"])
    sources = [
        QuantizedRows(m, n, bits, _bit_slice(t["codes"], r0 * n * bits, m * n * bits),
                      t["scale"][r0 : r0 + m].clone(), t["zero"][r0 : r0 + m].clone())
        for r0, m in zip(_offsets(member_rows), member_rows)
    ]
    return [], sources


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
        _refer(self, "parts", tuple(kinds))

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
        _refer(self, "source", source)

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
        _refer(self, "cache", cache)


# --- swapping them in ----------------------------------------------------------------------------


def _cache(cache: bool | int) -> DecodeCache | None:
    if cache is True:
        return DecodeCache(None)
    if cache is False or cache == 0:
        return None
    if isinstance(cache, int) and cache > 0:
        return DecodeCache(cache)
    raise AECompressError(f"cache must be true, false or a positive number of bytes, got {cache!r}")


def check_forms(forms: Sequence[StoredForm]) -> None:
    """Refuse, naming the group, any stored form whose method has no run-time form."""
    for form in forms:
        if form.method not in RUNTIME:
            raise AECompressError(
                f"group {form.group.name!r} uses method {form.method!r}, which has no per-layer run-time form "
                f"(run-time methods: {', '.join(sorted(RUNTIME))}); load it with materialize=True instead"
            )


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


def to_runtime(model: nn.Module, forms: Sequence[StoredForm], cache: bool | int = False) -> nn.Module:
    """Replace the compressed weights of ``model`` by modules that decode them when they run.

    Args:
        model: the transformers model the forms were made from (weights of
            untouched parameters already loaded); changed in place.
        forms: the stored form of every compressed group.
        cache: keep decoded matrices between calls (only while nothing needs
            their gradient): ``False`` (the default) decodes on every call,
            ``True`` keeps all of them, an integer keeps at most that many bytes.

    Returns:
        The same model, its compressed weights held as in their stored forms.

    Raises:
        AECompressError: naming the group, if a form's method or an owning
            module has no run-time form.
    """
    forms = list(forms)
    check_forms(forms)
    decode_cache = _cache(cache)
    params = dict(model.named_parameters())
    for form in forms:
        missing = [m.param for m in form.group.members if m.param not in params]
        if missing:
            raise AECompressError(f"group {form.group.name!r} names {missing[0]!r}, which this model does not have")
    groups: dict[str, GroupRuntime] = {}
    by_param: dict[str, tuple[str, object, dict[int, RowSource]]] = {}
    for form in forms:
        member_rows = [m.view(params[m.param]).shape[0] for m in form.group.members]
        shared, sources = RUNTIME[form.method](form, member_rows)
        for member, source in zip(form.group.members, sources):
            _refer(source, "cache", decode_cache)
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


def load_runtime(directory: str | Path, cache: bool | int = False) -> nn.Module:
    """Load a compact export in its run-time form (the hook for ``evaluate --runtime``).

    Args:
        directory: a directory written by ``aecompress export --format compact``.
        cache: see :func:`to_runtime`.
    """
    from aecompress.compact import load_compact

    return load_compact(directory, materialize=False, cache=cache)


def check_runtime_source(directory: Path) -> None:
    """Say what to do instead when asked to run a directory that is not a compact export."""
    from aecompress.export import SIDECAR

    sidecar = directory / SIDECAR
    if not sidecar.is_file():
        if (directory / "config.json").is_file():
            raise AECompressError(
                f"{str(directory)!r} is a plain transformers checkpoint, not a compact aecompress export; "
                "the run-time form needs one: write it with `aecompress export --format compact`"
            )
        return  # read_sidecar gives the general message
    try:
        fmt = json.loads(sidecar.read_text()).get("format")
    except (OSError, ValueError):
        return
    if fmt == "aecompress-decoded":
        raise AECompressError(
            f"{str(directory)!r} is a decoded export (full-size weights), so it cannot run compressed; "
            "export with `--format compact` and load that with materialize=False, "
            "or load this one with transformers' from_pretrained"
        )


# --- accounting and the benchmark ----------------------------------------------------------------
