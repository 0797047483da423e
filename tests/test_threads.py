"""``one_thread``: torch on one thread inside, the caller's count back after it, errors included."""

import pytest
import torch

from aecompress.blocks.threads import one_thread


def test_one_thread_inside_and_the_count_restored_even_after_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError), one_thread():
            raise ValueError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
