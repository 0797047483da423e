"""The autoencoder method: latents and a decoder shared by a group's layers, decoded or run per layer.

Its stored form keeps the latents (float, or 3- to 8-bit codes with a float16 scale per row),
the decoder's weights and biases, and the row norms when they are enforced. It has no
closed-form compressor: forms come from training (``aecompress fit`` or a benchmark recipe,
see :mod:`aecompress.training`). The networks and their sizing are in
:mod:`aecompress.blocks.autoencoder_nets`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aecompress.blocks.autoencoder_nets import NORM_EPS, AESpec, ResidualDecoder, apply_decoder, build_decoder
from aecompress.blocks.base import Built, Method
from aecompress.core.codes import runtime_values
from aecompress.core.errors import AECompressError
from aecompress.core.rowsource import RowSource, refer
from aecompress.core.stored import StoredForm


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
        refer(self, "decoder", decoder)
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


def runtime(form: StoredForm, member_rows: list[int], dtype: torch.dtype | None = None) -> Built:
    """One decoder for the group; each member keeps its own latents and norms.

    Args:
        form: the stored form.
        member_rows: rows of each member.
        dtype: run the decoder in this dtype (``decode`` uses float32); default: as stored.
    """
    spec = AESpec.from_dict(form.meta["spec"])
    decoder = build_decoder(spec)
    state = {k.removeprefix("decoder."): v for k, v in form.tensors.items() if k.startswith("decoder.")}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    try:
        decoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise AECompressError(f"group {form.group.name!r}: stored decoder does not match its spec: {err}") from err
    latents = runtime_values(form.tensors, "latents", spec.latent).split(member_rows)
    norms = form.tensors["norms"].split(member_rows) if spec.enforce_norm else [None] * len(member_rows)
    sources = [AERows(lat.clone(), None if nrm is None else nrm.clone(), decoder, spec.width)
               for lat, nrm in zip(latents, norms)]
    return [decoder.eval()], list(sources)


@torch.no_grad()
def decode(stored: StoredForm) -> torch.Tensor:
    """Run the stored decoder over the stored latents in float32 (CPU, deterministic)."""
    (decoder,), (source,) = runtime(stored, [stored.group.rows], torch.float32)
    return apply_decoder(decoder.float().eval(), source.latents.float(), source.norms)


METHOD = Method("ae", decode=decode, runtime=runtime)
