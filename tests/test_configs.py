"""Every shipped YAML parses against the signatures it configures."""

from pathlib import Path

import pytest

from aecompress.cli import main

ALL = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
BENCHMARKS = [c for c in ALL if c.name.startswith(("benchmark_", "ablation_"))]
COMPRESS = [c for c in ALL if c.name.startswith("compress_")]
CONFIGS = [c for c in ALL if c not in BENCHMARKS and c not in COMPRESS]


def _printed(command: str, config: Path, capsys) -> str:
    """What ``--print_config`` prints for ``config`` under ``command``; it must parse and exit 0 without loading a model."""
    with pytest.raises(SystemExit) as exc:
        main([command, "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_configs_exist():
    assert any(c.name == "default.yaml" for c in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_validates(config, capsys):
    # --print_config parses and type-checks every key, then exits 0 without loading any model.
    printed = _printed("fit", config, capsys)
    assert "data:" in printed and "model:" in printed


def test_a_typo_in_a_config_fails_validation(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((Path(__file__).parents[1] / "configs" / "default.yaml").read_text().replace("enforce_norm", "enforce_nrom"))
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(bad), "--print_config"])
    assert exc.value.code != 0


@pytest.mark.parametrize("config", BENCHMARKS, ids=[c.name for c in BENCHMARKS])
def test_benchmark_config_validates(config, capsys):
    printed = _printed("benchmark", config, capsys)
    assert "methods:" in printed and "ratios:" in printed
    for line in printed.splitlines():
        if "recipe:" in line and "null" not in line:
            recipe = Path(__file__).parents[1] / line.split("recipe:")[1].strip()
            assert recipe.is_file(), recipe


@pytest.mark.parametrize("config", COMPRESS, ids=[c.name for c in COMPRESS])
def test_compress_config_validates(config, capsys):
    # A whole-model recipe configures `compress`, not `fit`: it must parse there, and keep its tune.
    printed = _printed("compress", config, capsys)
    assert "bits:" in printed and "tune_steps:" in printed


def test_compress_configs_exist():
    assert COMPRESS, "the whole-model recipe configs/compress_best.yaml is missing"
