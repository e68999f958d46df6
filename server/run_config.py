"""The run config of a federated job, both ways: what `restnet fl run` and the demo hand Flower, and the typed
settings the ServerApp reads back.

Flower passes a run config as flat key/values. pyproject.toml's `[tool.flwr.app.config]` must list every key with
a default (for a plain `flwr run .`); `restnet` overrides all of them from the fleet config. The keys are named
only here, and the defaults are the fleet config's (`shared.config.FederatedConfig`, `DataConfig`): a test holds
pyproject's copy to them.

Flower hands a run's config to every SuperNode, so no secret travels in it: the coordinator's API token is written
to a file beside the run's results (owner-only), which the ServerApp reads on the same host, and the run config
carries only that file's path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from shared.artifacts import atomic_write
from shared.config import Config, DataConfig
from shared.errors import RestnetError
from shared.node_data import data_from_flat, data_to_flat
from shared.vocabulary import UPDATE_FORMATS

TOKEN_FILE = "coordinator-token"


@dataclass
class RunSettings:
    """What the ServerApp needs to run a federation, typed."""

    catalog: Path
    data: DataConfig
    rounds: int
    local_epochs: int
    lr: float
    batch_size: int
    aggregation: str
    update_format: str  # what devices send back (shared.updates)
    trim_fraction: float
    norm_bound: float
    round_timeout: float
    query_timeout: float
    min_nodes: int
    wait_nodes_timeout: float
    output_dir: Path | None
    coordinator_url: str
    coordinator_token: str  # sent as `Authorization: Bearer` (the fleet config's api_token, read from its file)
    coordinator_ca: str  # CA file to verify an HTTPS coordinator ("" = the system's)

    @classmethod
    def from_run_config(cls, cfg: Mapping) -> "RunSettings":
        if not cfg.get("catalog"):
            raise RestnetError("run config `catalog` is empty", "pass the catalog folder: restnet fl run --catalog DIR")
        update_format = str(cfg["update-format"])
        if update_format not in UPDATE_FORMATS.values():
            raise RestnetError(f"run config `update-format` is {update_format!r}",
                               f"use one of {', '.join(UPDATE_FORMATS.values())}")
        return cls(
            catalog=Path(str(cfg["catalog"])), data=data_from_flat(cfg), rounds=int(cfg["num-server-rounds"]),
            local_epochs=int(cfg["local-epochs"]), lr=float(cfg["learning-rate"]), batch_size=int(cfg["batch-size"]),
            aggregation=str(cfg["aggregation"]), update_format=update_format, trim_fraction=float(cfg["trim-fraction"]),
            norm_bound=float(cfg["norm-bound"]), round_timeout=float(cfg["round-timeout"]),
            query_timeout=float(cfg["query-timeout"]), min_nodes=int(cfg["min-nodes"]),
            wait_nodes_timeout=float(cfg["wait-nodes-timeout"]),
            output_dir=Path(str(cfg["output-dir"])) if cfg["output-dir"] else None,
            coordinator_url=str(cfg["coordinator-url"]).rstrip("/"),
            coordinator_token=_read_token(str(cfg["coordinator-token-file"])),
            coordinator_ca=str(cfg["coordinator-ca"]),
        )


def run_config(cfg: Config, catalog_dir: Path | str, output_dir: Path | str, coordinator_url: str = "",
               min_nodes: int = 1, rounds: int | None = None, simulation_dir: Path | str = "") -> dict:
    """The ServerApp's run config for a fleet config (every key of pyproject's [tool.flwr.app.config]); writes the
    API token, if the fleet has one, to `output_dir/TOKEN_FILE`. `simulation_dir`: the virtual devices of
    `restnet fl simulate` (read by the ClientApp, `shared.node_data`)."""
    fed = cfg.federated
    if cfg.fleet.api_token and not str(output_dir):
        raise RestnetError("the coordinator's API token needs the run's output folder (it is written there)",
                           "give the run an output folder")
    token_file = _write_token(Path(output_dir), cfg.fleet.api_token) if cfg.fleet.api_token else ""
    return {"catalog": _absolute(catalog_dir), "output-dir": _absolute(output_dir),
            "coordinator-url": coordinator_url, "coordinator-token-file": token_file,
            "coordinator-ca": cfg.fleet.http_ca_file or "", "num-server-rounds": rounds or fed.rounds,
            "local-epochs": fed.local_epochs, "learning-rate": fed.lr, "batch-size": fed.batch_size,
            "aggregation": fed.aggregation, "update-format": UPDATE_FORMATS[fed.update_encoding],
            "trim-fraction": fed.trim_fraction, "norm-bound": fed.norm_bound, "round-timeout": fed.round_timeout_s,
            "query-timeout": fed.query_timeout_s, "min-nodes": min_nodes,
            "wait-nodes-timeout": fed.wait_nodes_timeout_s, "simulation-dir": _absolute(simulation_dir),
            **data_to_flat(cfg.data)}


def _write_token(folder: Path, token: str) -> str:
    path = folder / TOKEN_FILE
    atomic_write(path, token.encode())  # owner-only from the start
    return _absolute(path)


def _read_token(path: str) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise RestnetError(f"cannot read the coordinator's API token from {path}: {exc.strerror}",
                           "the ServerApp must run where `restnet fl run` wrote its output folder") from None


def _absolute(path: Path | str) -> str:
    """Flower runs the ServerApp in another working folder: paths travel absolute ("" stays unset)."""
    return str(Path(path).resolve()) if str(path) else ""
