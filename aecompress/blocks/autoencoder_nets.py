"""The autoencoder's networks over weight rows, and how big they may be.

An encoder maps a row (length ``width``) to a latent code of size ``latent``;
a decoder maps it back. Only the latents, the decoder and (optionally) the
row norms are stored, so sizes are solved from the stored budget alone: the
encoder is thrown away after training and costs nothing. With ``encoder:
free`` there is no encoder at all and the latents are trained directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
from torch import nn

from aecompress.core.budget import Budget, infeasible_bytes, largest_fitting
from aecompress.core.codes import SCALE_DTYPE, SCALES_SUFFIX, code_bytes, fake_quant, pack_codes, quantize_rows
from aecompress.core.dtypes import FLOAT_DTYPES, FloatDtype
from aecompress.core.errors import AECompressError

EncoderKind = Literal["mlp", "linear", "free"]
DecoderKind = Literal["mlp", "linear", "residual"]
OutActivation = Literal["tanh", "none"]
StorageDtype = FloatDtype
# ``dtype``: latents kept like the decoder. ``int3`` .. ``int8``: each latent row as integer
# codes of that many bits times one float16 scale (see :mod:`aecompress.core.codes`), so a larger
# latent size fits the same budget.
LatentStorage = Literal["dtype", "int3", "int4", "int5", "int6", "int7", "int8"]

# Norm division guard: a zero-norm row decodes to zero instead of NaN.
NORM_EPS = 1e-12


@dataclass(frozen=True)
class AESpec:
    """The fully resolved architecture of one group's autoencoder."""

    width: int
    latent: int
    decoder_hidden: tuple[int, ...]
    encoder_hidden: tuple[int, ...] | None  # None: free latents, no encoder
    out_activation: OutActivation = "tanh"
    enforce_norm: bool = True
    decoder: DecoderKind = "mlp"
    dtype: StorageDtype = "float32"
    latent_storage: LatentStorage = "dtype"

    @property
    def latent_bits(self) -> int | None:
        """Bits per stored latent code, or None when latents are kept in ``dtype``."""
        return None if self.latent_storage == "dtype" else int(self.latent_storage.removeprefix("int"))

    def decoder_sizes(self) -> list[int]:
        """Layer widths from latent to row (for ``residual``: of the non-linear branch)."""
        return [self.latent, *self.decoder_hidden, self.width]

    def decoder_numbers(self) -> int:
        """Parameters in the decoder (weights and biases): all of them are stored.

        Counted on the meta device from the module itself, so the count can never
        drift from what is built and stored.
        """
        with torch.device("meta"):
            return sum(p.numel() for p in build_decoder(self).parameters())

    def stored_numbers(self, rows: int) -> int:
        """Latents + decoder + norms (+ latent scales), as the accountant will count them.

        Codes of fewer than 8 bits are stored packed, so they count as the bytes that hold them.
        """
        bits, rest = self.latent_bits, self.decoder_numbers() + (rows if self.enforce_norm else 0)
        if bits is None:
            return rows * self.latent + rest
        # codes: one byte each (int8 or a packed byte); scales: one float16 per row
        return code_bytes(rows, self.latent, bits) - rows * SCALE_DTYPE.itemsize + rows + rest

    def stored_bytes(self, rows: int) -> int:
        """Bytes of the stored form: decoder and norms in ``dtype``; latents too, or integer codes plus row scales."""
        item = FLOAT_DTYPES[self.dtype].itemsize
        rest = self.decoder_numbers() + (rows if self.enforce_norm else 0)
        if self.latent_bits is not None:
            return code_bytes(rows, self.latent, self.latent_bits) + rest * item
        return (rows * self.latent + rest) * item

    def to_dict(self) -> dict:
        """JSON-ready form for checkpoints and sidecars."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AESpec:
        """Inverse of :meth:`to_dict`; JSON turns tuples into lists.

        A spec read from an artifact may only name the decoders, activations and
        dtypes built here: anything else is refused, never looked up or imported.
        """
        for key, kind, default in (("decoder", DecoderKind, "mlp"), ("out_activation", OutActivation, "tanh"),
                                   ("dtype", StorageDtype, "float32"),
                                   ("latent_storage", LatentStorage, "dtype")):
            if data.get(key, default) not in get_args(kind):
                raise AECompressError(f"unknown autoencoder {key} {data.get(key)!r}; valid: {', '.join(get_args(kind))}")
        enc = data.get("encoder_hidden")
        return cls(
            width=int(data["width"]),
            latent=int(data["latent"]),
            decoder_hidden=tuple(int(h) for h in data["decoder_hidden"]),
            encoder_hidden=None if enc is None else tuple(int(h) for h in enc),
            out_activation=data.get("out_activation", "tanh"),
            enforce_norm=bool(data.get("enforce_norm", True)),
            decoder=data.get("decoder", "mlp"),
            dtype=data.get("dtype", "float32"),
            latent_storage=data.get("latent_storage", "dtype"),
        )


def spec_for_scale(
    scale: int,
    width: int,
    encoder: EncoderKind,
    decoder: DecoderKind,
    encoder_widths: tuple[float, ...],
    decoder_widths: tuple[float, ...],
    latent_width: float,
    out_activation: OutActivation,
    enforce_norm: bool,
    residual_hidden: int = 32,
    dtype: StorageDtype = "float32",
    latent_storage: LatentStorage = "dtype",
) -> AESpec:
    """The architecture at one integer scale ``x`` (widths are multiples of it).

    For ``linear`` and ``residual`` decoders the scale is the latent size itself
    (times ``latent_width``); the residual branch has a fixed hidden width.
    """
    latent = max(1, round(latent_width * scale))
    if decoder == "mlp":
        dec = tuple(max(1, round(w * scale)) for w in decoder_widths)
    elif decoder == "residual":
        dec = (residual_hidden,)
    else:
        dec = ()
    enc: tuple[int, ...] | None
    if encoder == "free":
        enc = None
    elif encoder == "mlp":
        enc = tuple(max(1, round(w * scale)) for w in encoder_widths)
    else:
        enc = ()
    return AESpec(width, latent, dec, enc, out_activation, enforce_norm, decoder, dtype, latent_storage)


def solve_spec(
    group: str, rows: int, width: int, target: Budget, max_scale: int | None = None, **options
) -> AESpec:
    """The largest architecture whose stored bytes fit the budget.

    Storing in half precision doubles the numbers a budget buys, so the
    solved latent size (and so the rank) grows accordingly.

    Args:
        max_scale: the largest scale considered (default ``width``: for linear decoders a
            latent as wide as the row; refinement codes allow more).

    Raises:
        AECompressError: if even scale 1 does not fit; the message gives the feasible range.
    """

    def cost(scale: int) -> int:
        return spec_for_scale(scale, width, **options).stored_bytes(rows)

    scale = largest_fitting(cost, target.bytes(rows, width), upper=max_scale or width)
    if scale is None:
        raise infeasible_bytes(group, rows, width, target, cost(1), f"{options['decoder']} decoder")
    return spec_for_scale(scale, width, **options)


def mlp(sizes: list[int], out: nn.Module | None = None) -> nn.Sequential:
    """Linear layers with LeakyReLU between them and an optional output activation."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU())
    if out is not None:
        layers.append(out)
    return nn.Sequential(*layers)


class ResidualDecoder(nn.Module):
    """A linear map plus a small non-linear correction that starts at exactly zero.

    Initialized from a factorization, the linear part reproduces it and the
    zero-initialized last layer of the branch means training starts no worse
    than the factorization it begins from.
    """

    def __init__(self, latent: int, hidden: int, width: int):
        super().__init__()
        self.linear = nn.Linear(latent, width)
        self.branch = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, width))
        nn.init.zeros_(self.branch[2].weight)
        nn.init.zeros_(self.branch[2].bias)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.linear(latents) + self.branch(latents)


def build_decoder(spec: AESpec) -> nn.Module:
    """The decoder network for a spec (the stored part)."""
    if spec.decoder == "residual":
        return ResidualDecoder(spec.latent, spec.decoder_hidden[0], spec.width)
    return mlp(spec.decoder_sizes(), nn.Tanh() if spec.out_activation == "tanh" else None)


def apply_decoder(decoder: nn.Module, latents: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """Decode latents to rows in float32, rescaling each to its stored norm if given.

    The division happens in float32 after the decoder, so half-precision
    autocast cannot overflow the norm, and a zero row cannot produce NaN.
    """
    out = decoder(latents).float()
    if norms is None:
        return out
    scale = norms.float() / out.norm(dim=1).clamp_min(NORM_EPS)
    return out * scale.unsqueeze(1)


class GroupAutoencoder(nn.Module):
    """Encoder (or free latents) plus decoder for one weight group."""

    def __init__(self, spec: AESpec, rows: int):
        super().__init__()
        self.spec = spec
        self.decoder = build_decoder(spec)
        if spec.encoder_hidden is None:
            self.encoder = None
            self.latents = nn.Parameter(torch.randn(rows, spec.latent) * 0.1)
        else:
            self.encoder = mlp([spec.width, *spec.encoder_hidden, spec.latent])
            self.latents = None

    def encode(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Latent codes for a batch of rows (by value, or by index for free latents).

        With integer latent storage the codes pass through the rounding round trip, so
        training, validation and the stored form all see the same values.
        """
        latents = self.latents[index] if self.encoder is None else self.encoder(rows)
        bits = self.spec.latent_bits
        return latents if bits is None else fake_quant(latents, bits)

    def forward(self, rows: torch.Tensor, index: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
        """Reconstruct a batch of rows."""
        return apply_decoder(self.decoder, self.encode(rows, index), norms if self.spec.enforce_norm else None)

    @torch.no_grad()
    def stored_tensors(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """What is kept after training: latents, decoder parameters, and norms if enforced."""
        index = torch.arange(rows.shape[0])
        was_training = self.training
        self.eval()
        latents = self.encode(rows.float(), index).float()
        self.train(was_training)
        dtype = FLOAT_DTYPES[self.spec.dtype]
        bits = self.spec.latent_bits
        if bits is not None:
            codes, scales = quantize_rows(latents, bits)
            tensors = {"latents": pack_codes(codes, bits), "latents" + SCALES_SUFFIX: scales.contiguous()}
        else:
            tensors = {"latents": latents.detach().to(dtype).contiguous()}
        for name, value in self.decoder.state_dict().items():
            tensors[f"decoder.{name}"] = value.detach().to(dtype).clone().contiguous()
        if self.spec.enforce_norm:
            tensors["norms"] = rows.float().norm(dim=1).to(dtype).contiguous()
        return tensors
