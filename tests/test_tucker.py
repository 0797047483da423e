"""Tucker factorization of a stacked group (layers x rows x width), at the ranks that fit best.

Budget, export round trips and the run-time form are covered for every method of the table
(tests/test_baselines.py, tests/test_properties.py); these are Tucker's own properties.
"""

import pytest
import torch

from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import Member, WeightGroup
from aecompress.methods import compress, decode, runtime_parts
from aecompress.methods.tucker import tensor_of


def _group(layers: int, rows: int, width: int) -> WeightGroup:
    return WeightGroup("g", "g", tuple(Member(f"l.{i}.w", i, False) for i in range(layers)), layers * rows, width)


def _low_rank(ranks, shape, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    core = torch.randn(*ranks, generator=gen, dtype=torch.float64)
    factors = [torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0] for n, k in zip(shape, ranks)]
    return tensor_of(core, *factors).reshape(shape[0] * shape[1], shape[2]).float()


def test_a_tensor_of_low_multilinear_rank_is_recovered():
    w = _low_rank((2, 4, 6), (6, 16, 24))
    form = compress("tucker", _group(6, 16, 24), w, Budget.of_ratio(3.0))
    k1, k2, k3 = form.meta["ranks"]
    assert k1 >= 2 and k2 >= 4 and k3 >= 6
    torch.testing.assert_close(decode(form), w, rtol=1e-4, atol=1e-4)


def test_hooi_sweeps_never_fit_worse_than_the_hosvd_they_start_from():
    w = torch.randn(8 * 16, 24, generator=torch.Generator().manual_seed(1))
    error = {}
    for sweeps in (0, 2):
        form = compress("tucker", _group(8, 16, 24), w, Budget.of_ratio(4.0), iterations=sweeps)
        error[sweeps] = float((decode(form) - w).norm())
    assert error[2] <= error[0] * (1 + 1e-6)


def test_more_budget_never_fits_worse():
    w = torch.randn(4 * 16, 32, generator=torch.Generator().manual_seed(2))
    errors = [float((decode(compress("tucker", _group(4, 16, 32), w, Budget.of_ratio(r))) - w).norm()) for r in (10.0, 4.0, 2.0)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_a_group_of_unequal_matrices_is_refused():
    group = WeightGroup("g", "g", (Member("a", 0, False), Member("b", 1, False)), 5, 8)
    with pytest.raises(AECompressError, match=r"tucker' needs a group of equal matrices.*5 rows from 2 matrices"):
        compress("tucker", group, torch.randn(5, 8), Budget.of_ratio(2.0))


def test_each_layer_runs_from_its_row_of_u1_and_the_shared_bases():
    w = torch.randn(3 * 16, 32, generator=torch.Generator().manual_seed(3))
    form = compress("tucker", _group(3, 16, 32), w, Budget.of_ratio(4.0))
    shared, sources = runtime_parts(form, [16, 16, 16])
    assert len(shared) == 1 and len(sources) == 3
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for source, rows in zip(sources, decode(form).split(16)):
            torch.testing.assert_close(source.apply(x), x @ rows.T, rtol=1e-5, atol=1e-5)
