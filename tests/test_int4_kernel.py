"""Grid codes multiplied by torch's fused int4 kernel: close to the exact decode, and only where it fits."""

from __future__ import annotations

import pytest
import torch

from aecompress import load_compact, methods
from aecompress.blocks import int4_kernel
from aecompress.blocks.base import GroupStats
from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import Member, WeightGroup
from aecompress.runtime.modules import to_runtime
from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(not int4_kernel.available(), reason="this torch build has no int4 CPU kernel")


def group(rows: int, width: int) -> WeightGroup:
    return WeightGroup("g", "g", (Member("w", None, False),), rows, width)


def source(method: str, rows: int = 32, width: int = 192, bits: float = 8.0, **opts):
    """One member's run-time row source of a random matrix, set to use the kernel."""
    g = group(rows, width)
    w = torch.randn(rows, width, generator=torch.Generator().manual_seed(0))
    x = torch.randn(256, width, generator=torch.Generator().manual_seed(1))
    stats = GroupStats(tokens=256, covariances=[(x.t() @ x / 256).double()], member_rows=[rows])
    form = methods.compress(method, g, w, Budget.of_bits(bits), stats, **opts)
    (rows_source,) = methods.runtime_parts(form, [rows])[1]
    rows_source.kernel = "int4"
    return rows_source


def inputs(tokens: int, width: int = 192) -> torch.Tensor:
    return torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(2))


def exact(src, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, src.decode())


@pytest.mark.parametrize(("method", "bits", "opts"), [
    ("quantize", 8.0, {"code_bits": 4, "group_size": 32}),
    ("quantize", 8.0, {"code_bits": 3, "group_size": 96, "zeros": "int"}),
    ("quantize", 8.0, {"code_bits": 4}),  # one scale per row: the kernel's groups of 64 with one scale
    ("compensated", 3.6, {"group_size": 96, "fill": True}),  # 3- and 4-bit rows
])
def test_small_inputs_go_through_the_kernel_to_bfloat16_rounding(method, bits, opts):
    src = source(method, bits=bits, **opts)
    if method == "compensated":
        assert src.code_width() == 4 and 0 < int(src.wide.sum()) < src.rows_count
    with torch.no_grad():
        x = inputs(4)
        fused, want = src.apply(x), exact(src, x)
    assert src._int4[1] is not None  # the kernel ran
    assert not torch.equal(fused, want)  # bfloat16, not the exact path
    torch.testing.assert_close(fused, want, rtol=0.02, atol=0.02 * float(want.abs().max()))


def test_long_inputs_a_gradient_wider_codes_and_float32_stay_exact():
    src = source("quantize", code_bits=4, group_size=32)
    with torch.no_grad():
        long = inputs(int4_kernel.FUSED_TOKENS + 1)
        assert torch.equal(src.apply(long), exact(src, long))
    short = inputs(2)
    assert torch.equal(src.apply(short), exact(src, short))  # the scales want a gradient
    src.kernel = "float32"
    with torch.no_grad():
        assert torch.equal(src.apply(short), exact(src, short))
    wide = source("quantize", code_bits=5, group_size=32)
    with torch.no_grad():
        assert torch.equal(wide.apply(short), exact(wide, short))


def test_a_changed_scale_is_seen_by_the_next_call():
    src = source("quantize", code_bits=4, group_size=32)
    x = inputs(1)
    with torch.no_grad():
        before = src.apply(x)
        src.scale.mul_(2)
        src.zero.mul_(2)
        after = src.apply(x)
    torch.testing.assert_close(after, 2 * before, rtol=0.02, atol=0.02 * float(after.abs().max()))


@pytest.mark.parametrize(("rows", "width", "runs", "expected"), [
    (32, 192, 2, 32), (32, 192, 1, 64), (32, 512, 2, 256), (24, 192, 2, None), (32, 80, 1, None), (32, 96, 4, None),
])
def test_kernel_group(rows, width, runs, expected):
    assert int4_kernel.kernel_group(rows, width, runs) == expected


def test_an_unknown_kernel_is_one_line(tiny_dirs):
    from aecompress.core.groups import extract_rows
    from aecompress.core.selection import select_groups
    from aecompress.data.calibration import collect
    from tests.conftest import build_tiny

    model = build_tiny("llama")
    (g,) = select_groups(model, ["k_proj"], "concatenated")
    stats = collect(model, [g], torch.randint(50, (2, 16)), what=("covariance",))[g.name]
    form = methods.compress("compensated", g, extract_rows(model, g), Budget.of_bits(4.0), stats)
    with pytest.raises(AECompressError, match="kernel 'int8' is not one of: int4, float32"):
        to_runtime(model, [form], kernel="int8")


def test_the_runtime_form_generates_with_the_kernel(tmp_path, tiny_lm, capsys, cache):
    out = tmp_path / "compact"
    code, _, err = run_cli(capsys, "compress", "--model", tiny_lm["model"], "--bits", "4", "--tune_steps", "0",
                           "--calibration", f"{tiny_lm['text']}:all[-2048:]", "--calibration_window", "64",
                           "--format", "compact", "--out_dir", out)
    assert code == 0, err
    ids = torch.randint(50, (1, 3), generator=torch.Generator().manual_seed(0))
    exact_model = load_compact(out, materialize=False, kernel="float32")
    fused_model = load_compact(out, materialize=False)
    decoded = load_compact(out)
    with torch.no_grad():
        want = decoded(input_ids=ids).logits
        assert torch.equal(exact_model(input_ids=ids).logits, want)
        got = fused_model(input_ids=ids).logits
    held = [s for s in fused_model.modules() if isinstance(s, int4_kernel.FusedRows)]
    assert held and all(getattr(s, "_int4", (None, None))[1] is not None for s in held)
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * float(want.abs().max()))


def test_an_input_that_wants_a_gradient_and_inference_mode_are_served():
    src = source("quantize", code_bits=4, group_size=32)
    src.requires_grad_(False)
    x = inputs(2).requires_grad_(True)
    src.apply(x).sum().backward()  # the exact path: the kernel has no derivative
    assert x.grad is not None and getattr(src, "_int4", None) is None
    with torch.inference_mode():
        made = source("quantize", code_bits=4, group_size=32)  # inference tensors keep no version counter
        made.apply(inputs(2))
    assert made._int4[1] is not None


def test_runtime_bench_refuses_an_unknown_kernel_in_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "runtime-bench", "--directory", tmp_path, "--kernel", "int8")
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("aecompress: error:")]
    assert len(lines) == 1 and "kernel 'int8' is not one of: int4, float32" in lines[0], err
