"""Bounded teacher targets: top-k log-probabilities with tail mass, and the KL over them."""

import pytest
import torch
import transformers
from conftest import TINY

from aecompress.core.errors import AECompressError
from aecompress.training.teacher import Teacher, coarse_kl, top_k_targets


def _full_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    p, q = teacher.log_softmax(-1), student.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean()


def test_with_every_token_kept_it_is_the_full_kl():
    torch.manual_seed(0)
    teacher, student = torch.randn(3, 5, 40) * 3, torch.randn(3, 5, 40) * 3
    assert torch.allclose(coarse_kl(student, top_k_targets(teacher, 40)), _full_kl(student, teacher), atol=1e-5)


def test_a_top_k_kl_is_a_lower_bound_that_tightens_with_k_and_vanishes_at_the_teacher():
    torch.manual_seed(1)
    teacher, student = torch.randn(4, 7, 300) * 4, torch.randn(4, 7, 300) * 4
    full = _full_kl(student, teacher)
    kls = [float(coarse_kl(student, top_k_targets(teacher, k))) for k in (1, 8, 64, 300)]
    assert all(0 <= a <= b + 1e-6 for a, b in zip(kls, kls[1:])) and kls[-1] == pytest.approx(float(full), abs=1e-5)
    assert kls[0] < float(full)
    assert float(coarse_kl(teacher, top_k_targets(teacher, 8))) == pytest.approx(0.0, abs=1e-6)


def test_the_kl_has_gradients_and_they_point_towards_the_teacher():
    torch.manual_seed(2)
    teacher = torch.randn(2, 3, 50) * 2
    student = torch.zeros(2, 3, 50, requires_grad=True)
    targets = top_k_targets(teacher, 10)
    before = coarse_kl(student, targets)
    before.backward()
    with torch.no_grad():
        after = coarse_kl(student - 0.5 * student.grad, targets)
    assert float(after) < float(before.detach())


def _tiny_lm(vocab: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=TINY["hidden"], num_hidden_layers=1,
                                      num_attention_heads=TINY["heads"], num_key_value_heads=1,
                                      intermediate_size=TINY["inter"], max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def test_what_the_teacher_keeps_does_not_grow_with_the_vocabulary():
    ids = torch.randint(0, 100, (2, 16))
    kept = []
    for vocab in (128, 4096):
        teacher = Teacher(top_k=8)
        teacher.targets(_tiny_lm(vocab), ids)
        teacher.targets(_tiny_lm(vocab), ids)  # the same batch again is not kept twice
        kept.append(teacher.nbytes)
    assert kept[0] == kept[1] == 2 * 16 * (8 * 8 + 8 * 4 + 4)
    whole = Teacher(top_k=None)
    whole.targets(_tiny_lm(4096), ids)
    assert whole.nbytes == 2 * 16 * 4096 * 2


def test_bad_top_k_is_one_clear_error():
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"top_k must be a positive integer or null, got {bad!r}"):
            Teacher(top_k=bad)
    from aecompress.training.module import CompressorModule

    group = {"name": "g", "module_type": "g", "members": [{"param": "w", "layer": 0, "transposed": False}],
             "rows": 8, "width": 8, "ratio": 2.0}
    with pytest.raises(AECompressError, match="model.teacher_top_k: top_k must be a positive integer or null, got 0"):
        CompressorModule(groups=[group], loss="output", teacher_top_k=0)
