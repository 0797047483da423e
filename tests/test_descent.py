"""Coordinate descent on integer codes: it lowers the layer's output error plus rate, and stops at a local minimum."""

import torch

from aecompress.blocks.descent import descended
from aecompress.blocks.feedback import damped


def _problem(seed=0, rows=24, width=40):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, width, generator=g)
    x = torch.randn(5 * width, width, generator=g) @ (torch.randn(width, width, generator=g) / width**0.5 + torch.eye(width))
    h = (x.T @ x / x.shape[0]).double()
    steps = torch.full((width,), 0.7)
    codes = torch.round(w / steps).long()  # plain rounding: far from the minimum under correlated inputs
    return w, h, steps, codes


def _objective(w, codes, steps, h, damp, precision, cost, low):
    e = (w - codes.float() * steps).double()
    distortion = float(((e @ damped(h, damp)) * e).sum())
    if cost is None:
        return distortion
    priced = cost[(codes - low).clamp(0, cost.numel() - 1)].double() * (steps.double() ** 2 * precision.double())
    return distortion + float(priced.sum())


def test_sweeps_lower_the_objective_and_zero_sweeps_change_nothing():
    w, h, steps, codes = _problem()
    precision = torch.ones(w.shape[1])
    assert torch.equal(descended(w, codes, steps, h, 0.01, precision, 0), codes)
    before = _objective(w, codes, steps, h, 0.01, precision, None, 0)
    one = descended(w, codes, steps, h, 0.01, precision, 1)
    three = descended(w, codes, steps, h, 0.01, precision, 3)
    assert _objective(w, one, steps, h, 0.01, precision, None, 0) < 0.9 * before
    assert _objective(w, three, steps, h, 0.01, precision, None, 0) <= _objective(w, one, steps, h, 0.01, precision, None, 0)


def test_enough_sweeps_end_where_no_single_move_helps():
    """Brute force: after convergence, moving any one weight one code up or down raises error plus rate."""
    w, h, steps, codes = _problem(seed=1, rows=6, width=12)
    low = int(codes.min()) - 2
    cost = torch.linspace(0, 1, int(codes.max()) - low + 3).flip(0).abs() * 0.3 + 0.05
    precision = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(2)) + 0.5
    done = descended(w, codes, steps, h, 0.01, precision, 30, cost, low)
    best = _objective(w, done, steps, h, 0.01, precision, cost, low)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            for dq in (-1, 1):
                moved = done.clone()
                moved[i, j] += dq
                if 0 <= int(moved[i, j]) - low < cost.numel():
                    assert _objective(w, moved, steps, h, 0.01, precision, cost, low) >= best - 1e-6 * abs(best)


def test_the_block_size_changes_the_speed_not_the_codes():
    w, h, steps, codes = _problem(seed=4, rows=16, width=50)
    precision = torch.ones(w.shape[1])
    runs = [descended(w, codes, steps, h, 0.01, precision, 2, block=b) for b in (1, 7, 50)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
