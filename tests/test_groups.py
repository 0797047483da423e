"""Selecting weight groups and writing rows back."""

import pytest
import torch

from aecompress.core.errors import AECompressError
from aecompress.core.groups import assign_rows, extract_rows
from aecompress.core.selection import select_groups
from tests.conftest import TINY, build_tiny

CASES = [
    ("bert", ["query", "key", "value", "attention_output", "intermediate", "output", "word_embeddings"]),
    ("gpt2", ["query", "key", "value", "attention_output", "mlp_fc", "mlp_proj", "wte"]),
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]),
]


@pytest.mark.parametrize("family,modules", CASES)
@pytest.mark.parametrize("mode", ["concatenated", "separated"])
def test_extract_then_assign_is_identity(family, modules, mode):
    model = build_tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = select_groups(model, modules, mode)
    for group in groups:
        rows = extract_rows(model, group)
        assert rows.shape == (group.rows, group.width)
        assign_rows(model, group, rows)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family,modules", CASES)
def test_assign_changes_only_the_group(family, modules):
    model = build_tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (group,) = select_groups(model, [modules[1]], "concatenated")
    assign_rows(model, group, torch.zeros(group.rows, group.width))
    assert torch.count_nonzero(extract_rows(model, group)) == 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {m.param for m in group.members}


def test_gpt2_conv1d_is_read_in_linear_layout_and_split():
    model = build_tiny("gpt2")
    groups = {g.name: g for g in select_groups(model, ["query", "key", "value", "mlp_fc"])}
    h = TINY["hidden"]
    c_attn = model.transformer.h[0].attn.c_attn.weight  # Conv1D: (in, 3*out)
    key_rows = extract_rows(model, groups["key"])
    assert torch.equal(key_rows[:h], c_attn.t()[h : 2 * h])
    assert groups["mlp_fc"].width == h and groups["mlp_fc"].rows == 2 * 4 * h
    assert all(m.transposed for g in groups.values() for m in g.members)


def test_concatenated_stacks_layers_in_order():
    model = build_tiny("llama")
    (group,) = select_groups(model, ["k_proj"])
    assert [m.layer for m in group.members] == [0, 1]
    assert group.rows == 2 * model.config.num_key_value_heads * (TINY["hidden"] // TINY["heads"])


def test_separated_makes_one_group_per_matrix():
    groups = select_groups(build_tiny("bert"), ["key"], "separated")
    assert [g.name for g in groups] == ["key.0", "key.1"]


def test_aliases_patterns_and_filters():
    model = build_tiny("llama")
    assert [g.name for g in select_groups(model, ["key", "mlp"])] == ["k_proj", "gate_proj", "up_proj", "down_proj"]
    (group,) = select_groups(model, ["*.k_proj.weight"], exclude=["*layers.0.*"])
    assert [m.layer for m in group.members] == [1]
    (group,) = select_groups(model, ["q_proj"], include=["*layers.1.*"])
    assert [m.layer for m in group.members] == [1]


def test_unknown_module_lists_valid_names():
    with pytest.raises(AECompressError, match="unknown module type 'keys'.*valid: .*key"):
        select_groups(build_tiny("bert"), ["keys"])


def test_pattern_without_match_lists_parameters():
    with pytest.raises(AECompressError, match=r"matches no weights.*encoder\.layer\.\*\.attention"):
        select_groups(build_tiny("bert"), ["*.nothing.weight"])


def test_mixed_widths_cannot_be_concatenated():
    with pytest.raises(AECompressError, match="different widths"):
        select_groups(build_tiny("bert"), ["*.dense.weight"])
