"""Grid codes multiplied without decoding them: torch's fused int4 CPU kernel, for generation-sized inputs.

A just-in-time decode widens every code of a layer to float32 and then multiplies: for one new token
that is far more work than the multiply itself, so a compact model generated about 8 times slower
than the original (SmolLM2-135M at 3 bits per weight: 3.3 against 27.8 tokens per second). torch ships
a kernel that multiplies packed 4-bit codes by their group scales and zeros directly
(``aten._weight_int4pack_mm_for_cpu``). Codes of up to 4 bits fit it unchanged (a 3-bit code is a 4-bit
code below 8), so a layer keeps its codes at half a byte per weight and never forms its float rows.

Where it applies, and what it costs:

- **Small inputs only** (at most :data:`FUSED_TOKENS` positions): one new token per step. A long prompt
  is decoded and multiplied in float32 as before, where the decode is shared by many positions.
- **bfloat16 arithmetic:** the kernel reads bfloat16 activations, scales and zeros, and is fast only there
  (its float32 path was 20 times slower than a float32 matmul on this machine). Outputs differ from the
  exact decode by bfloat16 rounding; ``kernel: float32`` keeps every step exact.
- **Shapes it takes:** rows a multiple of 16, and a run of columns per scale that splits into the kernel's
  groups of 32, 64, 128 or 256 columns (96 becomes three groups of 32 with the same scale: exact).
  Any other form, wider codes, a decode cache or a gradient (to the stored scales or to the input: the
  kernel has no derivative) falls back to the exact path.
"""

from __future__ import annotations

import functools

import torch

from aecompress.core.errors import AECompressError
from aecompress.core.rowsource import RowSource

FUSED_TOKENS = 16
"""Positions per call up to which a layer multiplies through the kernel (one new token per generation step)."""
KERNEL_GROUPS = (256, 128, 64, 32)
"""Columns per scale the kernel accepts, widest first."""
ROW_MULTIPLE = 16
"""The kernel packs rows in sixteens."""
KERNELS = ("int4", "float32")
"""``int4``: the fused kernel where the form and the input allow; ``float32``: always the exact decode."""
_OFFSET = 8
"""The kernel reads each 4-bit code ``q`` as ``q - 8``."""


def check_kernel(kernel: str) -> str:
    """``kernel`` if it is one of :data:`KERNELS`, else one line naming it and the valid ones."""
    if kernel not in KERNELS:
        raise AECompressError(f"kernel {kernel!r} is not one of: {', '.join(KERNELS)}")
    return kernel


@functools.cache
def available() -> bool:
    """Whether this torch build runs the kernel (tried once on a tiny matrix)."""
    try:
        q = torch.zeros(ROW_MULTIPLE, 32, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.ones(1, ROW_MULTIPLE, 2, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(1, 32, dtype=torch.bfloat16), packed, 32, sz)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def kernel_group(rows: int, width: int, runs: int) -> int | None:
    """The kernel's columns per scale for a form with ``runs`` scales per row, or None if it cannot hold it."""
    if rows % ROW_MULTIPLE or width % runs:
        return None
    run = width // runs
    return next((g for g in KERNEL_GROUPS if run % g == 0), None)


class Int4Matrix:
    """One matrix's codes packed for the kernel, with its scales and zeros in bfloat16 (built once, held)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int):
        """``W = zero + scale * code`` with ``codes`` (rows x width) in 0..15, ``scale`` and ``zero`` (rows x runs)."""
        rows, width = codes.shape
        repeat = width // scale.shape[1] // group
        scale = scale.float().repeat_interleave(repeat, dim=1)
        # The kernel computes (q - 8) * s + z', so z' = zero + 8 * s gives zero + s * q.
        shifted = zero.float().repeat_interleave(repeat, dim=1) + _OFFSET * scale
        self.group = group
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        self.scales_zeros = torch.stack([scale.t(), shifted.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.rows = rows

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Wᵀ`` in the dtype of ``x`` (the kernel runs in bfloat16)."""
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_zeros)
        return out.to(x.dtype).view(*x.shape[:-1], self.rows)


class FusedRows(RowSource):
    """Grid-code rows that multiply generation-sized inputs through the kernel where their form fits it.

    Subclasses say which codes, scales and zeros they hold (:meth:`grid`) and their widest code
    (:meth:`code_width`); everything else, and every input the kernel does not take, is the exact path.
    ``kernel`` is set by the run-time form (:data:`KERNELS`); a source made elsewhere stays exact.
    """

    kernel = "float32"

    def code_width(self) -> int:
        """The widest code this source holds, in bits."""
        raise NotImplementedError

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Its (rows x width) codes and (rows x runs) float scales and zeros: ``W = zero + scale * code``."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        fused = self._fused(x)
        if fused is None:
            return super().apply(x, bias)
        y = fused.matmul(x)
        return y if bias is None else y + bias

    def _fused(self, x: torch.Tensor) -> Int4Matrix | None:
        """The packed matrix, when this call may use it (rebuilt if a scale or zero changed since)."""
        if (self.kernel != "int4" or x.device.type != "cpu" or x.dtype != torch.float32
                or x.numel() // self.width > FUSED_TOKENS or self.cache is not None or not self._frozen()
                or (torch.is_grad_enabled() and x.requires_grad)  # the kernel has no derivative
                or self.code_width() > 4 or not available()):
            return None
        # Inference tensors keep no version counter, and cannot be changed outside inference mode anyway.
        key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in (*self.parameters(), *self.buffers()))
        held = getattr(self, "_int4", None)
        if held is None or held[0] != key:
            held = (key, self._packed())
            object.__setattr__(self, "_int4", held)  # not state: rebuilt from the stored tensors when needed
        return held[1]

    def _packed(self) -> Int4Matrix | None:
        codes, scale, zero = self.grid()
        if scale.dim() == 1:
            scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
        group = kernel_group(self.rows_count, self.width, scale.shape[1])
        return None if group is None else Int4Matrix(codes, scale, zero, group)
