"""Sizing autoencoders to a stored budget, counted by the one accountant."""

import math

import pytest
import torch

from aecompress.blocks.autoencoder_nets import GroupAutoencoder, solve_spec
from aecompress.core.budget import Budget, stored_bytes, stored_numbers
from aecompress.core.errors import AECompressError

OPTIONS = dict(encoder="mlp", decoder="mlp", encoder_widths=(8.0, 4.0), decoder_widths=(2.0, 4.0),
               latent_width=1.0, out_activation="tanh", enforce_norm=True)


@pytest.mark.parametrize("rows,width", [(64, 32), (128, 32), (2304, 384), (256, 64)])
@pytest.mark.parametrize("ratio", [2.0, 4.0, 10.0])
@pytest.mark.parametrize("decoder,encoder", [("mlp", "mlp"), ("linear", "linear"), ("linear", "free")])
def test_budget_never_exceeded_and_counted_exactly(rows, width, ratio, decoder, encoder):
    budget = Budget.of_ratio(ratio).bytes(rows, width)
    try:
        spec = solve_spec("g", rows, width, Budget.of_ratio(ratio), **{**OPTIONS, "decoder": decoder, "encoder": encoder})
    except AECompressError:
        pytest.skip("infeasible at this size")  # checked separately below
    ae = GroupAutoencoder(spec, rows)
    tensors = ae.stored_tensors(torch.randn(rows, width))
    assert stored_numbers(tensors) == spec.stored_numbers(rows) <= Budget.of_ratio(ratio).bytes(rows, width) // 4
    assert stored_bytes(tensors) == 4 * stored_numbers(tensors) == spec.stored_bytes(rows) <= budget
    assert rows * width / stored_numbers(tensors) >= ratio


def test_solution_is_the_largest_that_fits():
    rows, width, ratio = 2304, 384, 10.0
    budget = Budget.of_ratio(ratio).bytes(rows, width)
    spec = solve_spec("g", rows, width, Budget.of_ratio(ratio), **OPTIONS)
    bigger = solve_spec("g", rows, width, Budget.of_bits(31.9), **OPTIONS)
    assert spec.latent < bigger.latent
    from aecompress.blocks.autoencoder_nets import spec_for_scale

    assert spec_for_scale(spec.latent + 1, width, **OPTIONS).stored_bytes(rows) > budget


def test_infeasible_budget_states_the_range_in_bits_and_ratio():
    with pytest.raises(AECompressError, match=r"0.64 bits per weight \(ratio 50\) is infeasible .*feasible budgets are "
                                              r"[\d.]+ <= bits per weight < 32 \(feasible ratios are 1 < ratio <= \d"):
        solve_spec("key", 64, 32, Budget.of_ratio(50.0), **OPTIONS)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.0, -3.0, float("inf"), float("nan")])
def test_ratio_must_exceed_one(ratio):
    with pytest.raises(AECompressError, match="greater than 1"):
        Budget.of_ratio(ratio)


@pytest.mark.parametrize("bits", [0.0, -1.0, 32.0, 40.0, float("nan"), "3"])
def test_bits_must_lie_between_zero_and_thirty_two(bits):
    with pytest.raises(AECompressError, match="must be above 0 and below 32"):
        Budget.of_bits(bits)


@pytest.mark.parametrize("ratio", [2.0, 3.0, 4.0, 10.0, 32 / 3.194, 32 / 2.5, 7.3])
@pytest.mark.parametrize("rows,width", [(64, 32), (2304, 384), (576, 1536), (4608, 576)])
def test_a_budget_grants_what_its_ratio_always_granted(ratio, rows, width):
    """Whole float32 numbers, ``floor(rows * width / ratio)``, whether written as a ratio or in bits."""
    expected = math.floor(rows * width / ratio) * 4  # how budgets were granted before they were bits
    assert Budget.of_ratio(ratio).bytes(rows, width) == expected
    assert Budget.of_bits(32 / ratio).bytes(rows, width) in (expected, expected - 4, expected + 4)
    assert Budget.of_bits(2.5) == Budget.of_ratio(12.8) and Budget.of_bits(3.2) == Budget.of_ratio(10)
    assert Budget.parse(Budget.of_ratio(ratio).text) == Budget.of_ratio(ratio)


def test_zero_norm_rows_decode_without_nan():
    spec = solve_spec("g", 64, 32, Budget.of_ratio(2.0), **OPTIONS)
    ae = GroupAutoencoder(spec, 64)
    rows = torch.randn(64, 32)
    rows[3] = 0
    out = ae(rows, torch.arange(64), rows.norm(dim=1))
    assert torch.isfinite(out).all() and torch.count_nonzero(out[3]) == 0


@pytest.mark.parametrize("dtype,size", [("float16", 2), ("bfloat16", 2), ("float32", 4)])
def test_half_precision_storage_buys_a_larger_latent_at_the_same_bytes(dtype, size):
    rows, width, ratio = 2304, 384, 10.0
    options = {**OPTIONS, "encoder": "free", "decoder": "linear", "out_activation": "none", "enforce_norm": False}
    spec = solve_spec("g", rows, width, Budget.of_ratio(ratio), **options, dtype=dtype)
    full = solve_spec("g", rows, width, Budget.of_ratio(ratio), **options)
    tensors = GroupAutoencoder(spec, rows).stored_tensors(torch.randn(rows, width))
    assert all(t.element_size() == size for t in tensors.values())
    assert stored_bytes(tensors) == spec.stored_bytes(rows) <= Budget.of_ratio(ratio).bytes(rows, width)
    assert spec.latent >= 2 * full.latent - 1 if size == 2 else spec.latent == full.latent


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("enforce_norm", [False, True])
def test_int8_latents_are_counted_at_one_byte_plus_a_scale_per_row(dtype, enforce_norm):
    rows, width, ratio = 2304, 384, 10.0
    options = {**OPTIONS, "encoder": "free", "decoder": "linear", "out_activation": "none",
               "enforce_norm": enforce_norm, "dtype": dtype}
    budget = Budget.of_ratio(ratio).bytes(rows, width)
    spec = solve_spec("g", rows, width, Budget.of_ratio(ratio), **options, latent_storage="int8")
    same = solve_spec("g", rows, width, Budget.of_ratio(ratio), **options)
    tensors = GroupAutoencoder(spec, rows).stored_tensors(torch.randn(rows, width))
    assert tensors["latents"].dtype == torch.int8 and tensors["latents"].shape == (rows, spec.latent)
    assert tensors["latents_scales"].dtype == torch.float16 and tensors["latents_scales"].shape == (rows,)
    assert stored_bytes(tensors) == spec.stored_bytes(rows) <= budget
    assert stored_numbers(tensors) == spec.stored_numbers(rows)
    assert spec.latent > same.latent  # the point of int8: more rank for the same bytes


def test_int8_latents_decode_to_what_training_saw():
    from aecompress.core.codes import fake_quant, stored_values
    from aecompress.core.groups import WeightGroup
    from aecompress.core.stored import StoredForm
    from aecompress.methods import decode

    rows, width = 64, 32
    options = {**OPTIONS, "encoder": "free", "decoder": "linear", "out_activation": "none", "enforce_norm": False}
    spec = solve_spec("g", rows, width, Budget.of_ratio(2.0), **options, latent_storage="int8")
    ae = GroupAutoencoder(spec, rows)
    with torch.no_grad():
        ae.latents[5] = 0  # a zero row: scale 0, no NaN
    trained = ae(torch.zeros(rows, width), torch.arange(rows), None)
    tensors = ae.stored_tensors(torch.zeros(rows, width))
    latents = stored_values(tensors, "latents")
    assert torch.isfinite(latents).all() and torch.count_nonzero(latents[5]) == 0
    # Quantization error is bounded by half a step of each row's scale.
    step = tensors["latents_scales"].float().unsqueeze(1)
    assert ((latents - ae.latents.detach()).abs() <= step / 2 + 1e-6).all()
    assert not torch.equal(latents, ae.latents.detach())
    form = StoredForm("ae", WeightGroup("g", "g", (), rows, width), tensors, {"spec": spec.to_dict()})
    torch.testing.assert_close(decode(form), trained.detach(), rtol=0, atol=1e-5)
    # The round trip passes gradients straight through.
    z = torch.randn(4, 8, requires_grad=True)
    fake_quant(z, 4).sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
