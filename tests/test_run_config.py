"""The federated run config: one set of defaults (the fleet config's), the same keys both ways."""
from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

from server.run_config import RunSettings, run_config
from shared.config import Config, DataConfig, FederatedConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_defaults_are_the_fleet_config_defaults():
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == run_config(Config(), "", "")


def test_settings_read_back_what_the_runner_wrote(tmp_path):
    cfg = Config(data=DataConfig(dataset="digits", channels=1, seed=3),
                 federated=FederatedConfig(rounds=5, lr=0.01, aggregation="median", update_encoding="int8",
                                           trim_fraction=0.1, query_timeout_s=7))
    s = RunSettings.from_run_config(run_config(cfg, tmp_path / "cat", tmp_path / "out", "http://c:1/", min_nodes=4))
    assert (s.rounds, s.lr, s.aggregation, s.update_format, s.trim_fraction, s.query_timeout, s.min_nodes) == \
        (5, 0.01, "median", "delta-int8/1", 0.1, 7.0, 4)
    assert s.catalog == (tmp_path / "cat").resolve() and s.output_dir == (tmp_path / "out").resolve()
    assert s.coordinator_url == "http://c:1" and s.data == cfg.data
