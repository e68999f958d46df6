"""The federated run config: one set of defaults (the fleet config's), the same keys both ways."""
from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import json
import stat
from pathlib import Path

import pytest

from server.run_config import RunSettings, run_config
from shared.config import Config, DataConfig, FederatedConfig, FleetConfig
from shared.errors import RestnetError

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


def test_the_api_token_never_travels_in_the_run_config(tmp_path):
    """Flower hands a run's config to every SuperNode: the token stays in an owner-only file the ServerApp reads."""
    cfg = Config(fleet=FleetConfig(api_token="s3cret-token-value"))
    config = run_config(cfg, tmp_path / "cat", tmp_path / "out")
    assert "s3cret-token-value" not in json.dumps(config)
    path = Path(config["coordinator-token-file"])
    assert path.parent == (tmp_path / "out").resolve() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert RunSettings.from_run_config(config).coordinator_token == "s3cret-token-value"
    path.unlink()
    with pytest.raises(RestnetError, match="cannot read the coordinator's API token"):
        RunSettings.from_run_config(config)
    with pytest.raises(RestnetError, match="needs the run's output folder"):  # not into the working folder
        run_config(cfg, tmp_path / "cat", "")
