"""The paired significance test that guards the start (aecompress.evaluation.paired)."""

import math

import pytest
import torch

from aecompress.core.errors import AECompressError
from aecompress.evaluation.paired import gain_z


def test_a_consistent_gain_is_many_standard_errors_and_its_sign_follows_the_direction():
    torch.manual_seed(0)
    start = torch.rand(4096) * 5
    better = start - 0.05 + 0.01 * torch.randn(4096)  # lower NLL on nearly every token
    assert gain_z(better, start, higher_is_better=False, block=64) > 10
    assert gain_z(better, start, higher_is_better=True, block=64) < -10


def test_a_gain_buried_in_noise_is_not_significant():
    torch.manual_seed(0)
    start = torch.rand(4096) * 5
    noisy = start + torch.randn(4096)  # no systematic change at all
    noisy = noisy - (noisy - start).mean() + 0.001  # a tiny mean gain for the higher-is-better side
    assert 0 < gain_z(noisy, start, higher_is_better=True, block=64) < 1


def test_blocks_account_for_correlated_neighbours():
    # Each block of 64 items moves together: 64 blocks are 64 samples, not 4,096.
    torch.manual_seed(0)
    shift = torch.randn(64).repeat_interleave(64) + 0.2
    start = torch.zeros(4096)
    per_item, per_block = gain_z(start + shift, start, True, block=1), gain_z(start + shift, start, True, block=64)
    assert per_item == pytest.approx(8 * per_block, rel=0.05)


def test_identical_and_uniform_changes():
    start = torch.arange(10.0)
    assert gain_z(start.clone(), start, False) == 0.0
    assert gain_z(start - 1, start, False) == math.inf
    assert gain_z(start - 1, start, True) == -math.inf


def test_mismatched_items_are_refused():
    with pytest.raises(AECompressError, match="same length"):
        gain_z(torch.zeros(5), torch.zeros(6), True)
    with pytest.raises(AECompressError, match="at least 2 blocks"):
        gain_z(torch.zeros(1), torch.zeros(1), True)


def test_the_guarded_start_survives_a_checkpoint_read_safely(tmp_path):
    from aecompress.training.callbacks import ModelQualityCallback

    saved = ModelQualityCallback(significance=2.0)
    saved._start, saved._start_items = {"perplexity": 22.7}, {"perplexity": torch.rand(100, dtype=torch.float64)}
    torch.save(saved.state_dict(), tmp_path / "state.pt")
    loaded = ModelQualityCallback(significance=2.0)
    loaded.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert loaded._start == saved._start
    assert torch.equal(loaded._start_items["perplexity"], saved._start_items["perplexity"])


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_a_guard_of_no_standard_errors_is_refused(bad):
    from aecompress.training.callbacks import ModelQualityCallback

    with pytest.raises(AECompressError, match="positive number of standard errors"):
        ModelQualityCallback(significance=bad)
