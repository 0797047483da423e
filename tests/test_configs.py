"""Every shipped YAML parses against the signatures it configures."""

from pathlib import Path

import pytest

from aecompress.cli import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert any(c.name == "default.yaml" for c in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_validates(config, capsys):
    # --print_config parses and type-checks every key, then exits 0 without loading any model.
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "data:" in printed and "model:" in printed


def test_a_typo_in_a_config_fails_validation(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((Path(__file__).parents[1] / "configs" / "default.yaml").read_text().replace("enforce_norm", "enforce_nrom"))
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(bad), "--print_config"])
    assert exc.value.code != 0
