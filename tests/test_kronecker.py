"""Kronecker factorization: the nearest sum of Kronecker products at the budget's rank.

Budget, export round trips and the run-time form are covered for every method of the table
(tests/test_baselines.py, tests/test_properties.py); these are Kronecker's own properties.
"""

import pytest
import torch

from aecompress.core.budget import Budget
from aecompress.core.errors import AECompressError
from aecompress.core.groups import Member, WeightGroup
from aecompress.methods import compress, decode, runtime_parts
from aecompress.methods.kronecker import product, rearrange


def _group(rows: int, width: int, members: int = 1) -> WeightGroup:
    return WeightGroup("g", "g", tuple(Member(f"l.{i}.w", i, False) for i in range(members)), rows, width)


def _kron(rank: int, m1: int, n1: int, m2: int, n2: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return product(torch.randn(rank, m1, n1, generator=gen), torch.randn(rank, m2, n2, generator=gen))


def test_the_rearrangement_turns_a_kronecker_product_into_a_rank_one_matrix():
    w = _kron(1, 4, 8, 6, 8)
    assert torch.linalg.matrix_rank(rearrange(w.double(), 4, 8), rtol=1e-5) == 1
    assert torch.linalg.matrix_rank(rearrange(w.double(), 2, 8), rtol=1e-5) > 1


@pytest.mark.parametrize("rank", [1, 2])
def test_a_sum_of_kronecker_products_is_recovered_and_its_shape_found(rank):
    w = _kron(rank, 4, 8, 6, 8)
    form = compress("kronecker", _group(24, 64), w, Budget.of_ratio(8.0))
    assert form.meta["shape"] == [4, 8] and form.meta["rank"] >= rank
    torch.testing.assert_close(decode(form), w, rtol=1e-4, atol=1e-4)


def test_more_budget_never_fits_worse():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    errors = [float((decode(compress("kronecker", _group(48, 64), w, Budget.of_ratio(r))) - w).norm()) for r in (10.0, 4.0, 2.0)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_a_given_shape_is_used_or_refused_with_what_divides():
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    assert compress("kronecker", _group(24, 64), w, Budget.of_ratio(4.0), shape=(3, 4)).meta["shape"] == [3, 4]
    with pytest.raises(AECompressError, match=r"kronecker shape \[5, 4\] must divide group 'g' \(24 x 64\)"):
        compress("kronecker", _group(24, 64), w, Budget.of_ratio(4.0), shape=(5, 4))


def test_each_layer_runs_its_own_rows_of_the_shared_product():
    w = torch.randn(3 * 16, 32, generator=torch.Generator().manual_seed(3))
    form = compress("kronecker", _group(48, 32, members=3), w, Budget.of_ratio(4.0))
    shared, sources = runtime_parts(form, [16, 16, 16])
    assert len(shared) == 1 and len(sources) == 3
    with torch.no_grad():
        assert torch.equal(torch.cat([s.decode() for s in sources]), decode(form))
