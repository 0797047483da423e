"""Any architecture transformers builds: module types come from the model, not from a table of families.

Tiny random Gemma, OPT and GPT-NeoX models (none of them named anywhere in aecompress) are
fitted and exported with ``modules: [all]`` and with their own type names, no patterns written.
"""

import json
import re

import pytest
import torch
import transformers

from aecompress import load_compact
from aecompress.cli import main
from aecompress.core.errors import AECompressError
from aecompress.core.selection import block_types, module_types, select_groups
from tests.conftest import TINY, write_config

SIZES = dict(vocab_size=TINY["vocab"], hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
             num_attention_heads=TINY["heads"], max_position_embeddings=64)
CONFIGS = {
    "gemma": lambda: transformers.GemmaConfig(**SIZES, num_key_value_heads=1, head_dim=16, intermediate_size=TINY["inter"]),
    "opt": lambda: transformers.OPTConfig(**SIZES, ffn_dim=TINY["inter"], word_embed_proj_dim=TINY["hidden"]),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SIZES, intermediate_size=TINY["inter"]),
}
# What a user of each would write by name: each one of the model's own types, short or in full.
BLOCKS = {
    "gemma": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
    "gpt_neox": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
}
FREE = {"model.encoder": "free", "model.decoder": "linear", "model.out_activation": "none", "model.init": "svd",
        "model.enforce_norm": False, "data.ratio": 2.0}


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()


@pytest.mark.parametrize("family", list(CONFIGS))
def test_block_types_are_the_paths_without_the_layer_index(family):
    model = _model(family)
    assert block_types(model) == BLOCKS[family]
    assert set(BLOCKS[family]) < set(module_types(model))  # embeddings are types too, outside the blocks
    groups = select_groups(model, ["all"])
    in_blocks = [p for n, p in model.named_parameters() if p.dim() == 2 and re.search(r"\.\d+\.", n)]
    assert sum(g.rows * g.width for g in groups) == sum(p.numel() for p in in_blocks)
    assert all(sorted(m.layer for m in g.members) == list(range(TINY["layers"])) for g in groups)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_a_type_by_its_full_path_or_a_unique_suffix_selects_the_same_rows(family):
    model = _model(family)
    full = BLOCKS[family][0]
    (by_path,) = select_groups(model, [full])
    (by_suffix,) = select_groups(model, [full.rsplit(".", 1)[-1]])
    assert by_path.members == by_suffix.members and by_path.rows == by_suffix.rows


def test_an_ambiguous_or_unknown_name_lists_the_models_own_types():
    model = _model("gemma")
    with pytest.raises(AECompressError, match=r"unknown module type 'wq' for GemmaForCausalLM; valid: .*k_proj"):
        select_groups(model, ["wq"])


@pytest.mark.parametrize("family", list(CONFIGS))
def test_fit_and_export_a_model_no_table_names(family, tmp_path):
    source = tmp_path / "model"
    original = _model(family)
    original.save_pretrained(source)
    cfg = write_config(tmp_path / "cfg.yaml", source, ["all"], tmp_path, **FREE)
    main(["fit", "--config", str(cfg)])
    for fmt in ("decoded", "compact"):
        main(["export", "--config", str(cfg), "--ckpt_path", str(tmp_path / "ckpt" / "best.ckpt"),
              "--out_dir", str(tmp_path / fmt), "--format", fmt])
    decoded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "decoded")
    compact = load_compact(tmp_path / "compact")
    changed = {k for k, v in original.state_dict().items() if not torch.equal(v, decoded.state_dict()[k])}
    blocks = {n for n, p in original.named_parameters() if p.dim() == 2 and n.split(".")[-2] in
              {t.rsplit(".", 1)[-1] for t in BLOCKS[family]}}
    assert changed == blocks  # every block weight compressed, nothing else touched
    assert all(torch.equal(v, compact.state_dict()[k]) for k, v in decoded.state_dict().items())
    ids = torch.randint(TINY["vocab"], (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(decoded(input_ids=ids).logits).all()
    meta = json.loads((tmp_path / "compact" / "aecompress.json").read_text())
    assert meta["achieved_ratio"] >= 2.0
