"""``--config FILE``: a TOML table of a command's options; flags on the command line win."""

from __future__ import annotations

import json

import pytest
from kdcache_cli.config import read_config, write_toml
from tests_support import run_cli


def test_config_file_supplies_options_and_flags_override_it(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(write_toml({"dataset": "fake:16", "model": "cnn", "epochs": 3, "quiet": True,
                                  "out": str(tmp_path / "run")}))
    code, _, err = run_cli(["train", "--config", str(config), "--epochs", "1"], capsys)
    assert code == 0, err
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((tmp_path / "run" / "run.json").read_text())["dataset"] == "fake:16"


def test_unknown_key_in_config_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('bogus = 1\n')
    code, _, err = run_cli(["train", "--config", str(config), "--dataset", "fake:8", "--model", "cnn",
                            "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err.startswith("Error: config file") and "bogus" in err and err.count("\n") == 1


def test_missing_or_malformed_config_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_cli(["datasets", "--config", str(tmp_path / "none.toml")], capsys)
    assert code == 2 and "not found" in err
    broken = tmp_path / "broken.toml"
    broken.write_text("dataset = \n")
    code, _, err = run_cli(["datasets", "--config", str(broken)], capsys)
    assert code == 2 and "not valid TOML" in err and err.count("\n") == 1


def test_write_toml_round_trips_through_read_config(tmp_path):
    values = {"dataset": "fake:8", "epochs": 2, "lr": 0.05, "quiet": True, "energy_t": [1.0, 4.0],
              "path": 'a "quoted" \\ value'}
    path = tmp_path / "c.toml"
    path.write_text(write_toml(values | {"unset": None}))
    assert read_config(path) == values


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_config_needs_pyyaml_or_reads_it(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    path.write_text("epochs: 2\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        from kdcache.errors import MissingDependency

        with pytest.raises(MissingDependency, match="PyYAML"):
            read_config(path)
    else:
        assert read_config(path) == {"epochs": 2}
