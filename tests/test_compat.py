"""What was written before the layered redesign still loads and exports to the same bytes.

``tests/fixtures/compat`` holds two checkpoints fitted on the tiny Llama of ``conftest`` by the code
before the redesign (commit 9ba436b): ``best.yaml`` (free int codes, linear decoder, whitened start,
KL training) and ``paper.yaml`` (the seed's MLP autoencoder), each with its config, and the SHA-256
of what ``aecompress export`` wrote from them then. Exporting them now must give the same bytes.
"""

import hashlib
import json
from pathlib import Path

import pytest

from aecompress.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "compat"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
FILES = {"decoded": "model.safetensors", "compact": "compressed.safetensors"}


@pytest.mark.parametrize("recipe", ["best", "paper"])
@pytest.mark.parametrize("fmt", ["decoded", "compact"])
def test_a_checkpoint_from_before_the_redesign_exports_byte_identical(recipe, fmt, tiny_lm, tmp_path, cache):
    config = (FIXTURES / f"{recipe}.yaml").read_text()
    config = config.replace("@MODEL@", str(tiny_lm["model"])).replace("@TEXT@", str(tiny_lm["text"]))
    (tmp_path / "config.yaml").write_text(config.replace("@WORK@", str(tmp_path / "work")))
    out = tmp_path / fmt
    main(["export", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(FIXTURES / f"{recipe}.ckpt"),
          "--out_dir", str(out), "--format", fmt])
    digest = hashlib.sha256((out / FILES[fmt]).read_bytes()).hexdigest()
    assert digest == EXPECTED[f"{recipe}/{fmt}/{FILES[fmt]}"]
