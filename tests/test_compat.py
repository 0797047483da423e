"""What was written before the layered redesign still loads and exports to the same bytes.

``tests/fixtures/compat`` holds two checkpoints fitted on the tiny Llama of ``conftest`` by the code
before the redesign (commit 9ba436b): ``best.yaml`` (free int codes, linear decoder, whitened start,
KL training) and ``paper.yaml`` (the seed's MLP autoencoder), each with its config.

- ``best``: the SHA-256 of what ``aecompress export`` wrote from it then. Its decode is integer codes
  through a linear map, and its bytes have been the same on every machine seen.
- ``paper``: what the code before the redesign exported from it (``paper_decoded.safetensors``,
  ``paper_compact.safetensors``). Its decode runs a nonlinear MLP whose float kernels differ from
  one CPU to another in the last bits, so its exact bytes are a property of the machine, not of
  the code (on two machines, the code before and after the redesign gave byte-identical files, and
  the two machines' files differed). So every tensor is compared: same names, shapes and dtypes,
  and values equal up to float32 rounding.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aecompress.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "compat"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
FILES = {"decoded": "model.safetensors", "compact": "compressed.safetensors"}


def _export(recipe: str, fmt: str, tiny_lm, tmp_path: Path) -> Path:
    config = (FIXTURES / f"{recipe}.yaml").read_text()
    config = config.replace("@MODEL@", str(tiny_lm["model"])).replace("@TEXT@", str(tiny_lm["text"]))
    (tmp_path / "config.yaml").write_text(config.replace("@WORK@", str(tmp_path / "work")))
    out = tmp_path / fmt
    main(["export", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(FIXTURES / f"{recipe}.ckpt"),
          "--out_dir", str(out), "--format", fmt])
    return out / FILES[fmt]


@pytest.mark.parametrize("fmt", ["decoded", "compact"])
def test_the_best_recipe_checkpoint_from_before_the_redesign_exports_byte_identical(fmt, tiny_lm, tmp_path, cache):
    digest = hashlib.sha256(_export("best", fmt, tiny_lm, tmp_path).read_bytes()).hexdigest()
    assert digest == EXPECTED[f"best/{fmt}/{FILES[fmt]}"]


@pytest.mark.parametrize("fmt", ["decoded", "compact"])
def test_the_seed_recipe_checkpoint_from_before_the_redesign_exports_the_same_tensors(fmt, tiny_lm, tmp_path, cache):
    now = load_file(_export("paper", fmt, tiny_lm, tmp_path))
    before = load_file(FIXTURES / f"paper_{fmt}.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in now.items()} == {k: (v.shape, v.dtype) for k, v in before.items()}
    for name, tensor in before.items():
        torch.testing.assert_close(now[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
