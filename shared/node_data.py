"""A device's local data, described by flat key/values that fit a Flower node config (or run config).

A simulated device holds one partition of the dataset's training split (IID, or non-IID by a Dirichlet(alpha)
per class); every device computes the same partitioning from the same seed and keeps only its own part. A real
device with its own data uses `num-partitions = 1`.

On Flower's simulation engine a virtual SuperNode's node config holds only `partition-id` and `num-partitions`;
the run config's `simulation-dir` then names a folder whose `simulation.json` (`write_simulation`) says which
virtual device each node is: the variant folder it runs and the partition it owns (`NodeData.from_context`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from shared.config import DataConfig, PartitionConfig
from shared.errors import ConfigError

SIMULATION_FILE = "simulation.json"
DATA_KEYS = ("dataset", "data-root", "image-size", "channels", "val-fraction", "data-seed")


def data_to_flat(data: DataConfig) -> dict:
    """The data settings as flat config values (Flower configs hold no None: a missing root is "")."""
    return {"dataset": data.dataset, "data-root": data.root or "", "image-size": data.image_size,
            "channels": data.channels, "val-fraction": data.val_fraction, "data-seed": data.seed}


def data_from_flat(cfg: Mapping) -> DataConfig:
    missing = [k for k in DATA_KEYS if k not in cfg]
    if missing:
        raise ConfigError(f"config lacks the data settings {', '.join(missing)}",
                          "start nodes and runs with `restnet fl ...`, which fills them from the fleet config")
    return DataConfig(dataset=str(cfg["dataset"]), root=str(cfg["data-root"]) or None,
                      image_size=int(cfg["image-size"]), channels=int(cfg["channels"]),
                      val_fraction=float(cfg["val-fraction"]), seed=int(cfg["data-seed"]))


@dataclass
class NodeData:
    """What a SuperNode's node config says about its device: where the variant lives and which data it owns."""

    device_dir: Path
    data: DataConfig
    partition_id: int
    num_partitions: int
    partition: PartitionConfig

    def to_node_config(self) -> dict:
        return {"device-dir": str(self.device_dir), **data_to_flat(self.data),
                "partition-id": self.partition_id, "num-partitions": self.num_partitions,
                "partition-kind": self.partition.kind, "partition-alpha": self.partition.alpha,
                "partition-seed": self.partition.seed}

    @classmethod
    def from_node_config(cls, cfg: Mapping) -> "NodeData":
        keys = ("device-dir", "partition-id", "num-partitions", "partition-kind", "partition-alpha", "partition-seed")
        missing = [k for k in keys if k not in cfg]
        if missing:
            raise ConfigError(f"node config lacks {', '.join(missing)}",
                              "start the SuperNode with client.supernode, which writes the full node config")
        part, parts = int(cfg["partition-id"]), int(cfg["num-partitions"])
        if not 0 <= part < parts:
            raise ConfigError(f"partition-id {part} is outside 0..{parts - 1}")
        return cls(Path(str(cfg["device-dir"])), data_from_flat(cfg), part, parts,
                   PartitionConfig(kind=str(cfg["partition-kind"]), alpha=float(cfg["partition-alpha"]),
                                   seed=int(cfg["partition-seed"])))

    @classmethod
    def from_context(cls, node_config: Mapping, run_config: Mapping) -> "NodeData":
        """A real SuperNode's node config, or a virtual device of a simulation (`simulation-dir` in the run config)."""
        sim_dir = str(run_config.get("simulation-dir", "")) if "device-dir" not in node_config else ""
        if not sim_dir:
            return cls.from_node_config(node_config)
        sim = json.loads((Path(sim_dir) / SIMULATION_FILE).read_text())
        if int(node_config["num-partitions"]) != len(sim["devices"]):
            raise ConfigError(f"the simulation has {len(sim['devices'])} virtual devices with a variant, Flower runs "
                              f"{node_config['num-partitions']}", "start it with `restnet fl simulate`")
        index, folder = sim["devices"][int(node_config["partition-id"])]
        return cls(Path(sim_dir) / folder, data_from_flat(sim["data"]), int(index), int(sim["num_devices"]),
                   PartitionConfig(**sim["partition"]))

    def train_partition_description(self) -> dict:
        """Everything that decides which examples `load_train_partition` returns (the data part of a cache key)."""
        return {"split": "train", **data_to_flat(self.data), "partition-id": self.partition_id,
                "num-partitions": self.num_partitions, "partition-kind": self.partition.kind,
                "partition-alpha": self.partition.alpha, "partition-seed": self.partition.seed}

    def load_train_partition(self):
        """This device's share of the training split, as a TensorDataset."""
        # Imported here: torch costs seconds, and a ClientApp process that only answers a query never needs it.
        from torch.utils.data import TensorDataset

        from shared.datasets import partition_indices

        train = _train_split(self.data)
        key = (self.num_partitions, self.partition.kind, self.partition.alpha, self.partition.seed)
        if key not in _PARTITIONS:
            _PARTITIONS.clear()
            _PARTITIONS[key] = partition_indices(train.tensors[1].numpy(), *key)
        idx = _PARTITIONS[key][self.partition_id]
        return TensorDataset(*(t[idx] for t in train.tensors))


# A process that serves many virtual devices (the simulation engine's actors) loads the split and partitions it
# once; one entry each, so a process holds at most one dataset.
_TRAIN_SPLITS: dict[str, object] = {}
_PARTITIONS: dict[tuple, list] = {}


def _train_split(data: DataConfig):
    from shared.datasets import load_splits

    key = json.dumps(data_to_flat(data), sort_keys=True)
    if key not in _TRAIN_SPLITS:
        _TRAIN_SPLITS.clear()
        _PARTITIONS.clear()
        _TRAIN_SPLITS[key] = load_splits(data)[0]
    return _TRAIN_SPLITS[key]

def write_simulation(sim_dir: Path, devices: list[tuple[int, str]], num_devices: int, data: DataConfig,
                     partition: PartitionConfig) -> Path:
    """`simulation.json`: Flower's virtual node j is the virtual device `devices[j] = (i, folder)`: it runs the
    variant installed in `folder` (relative to `sim_dir`) on partition i of `num_devices`. Devices that no variant
    fits hold a partition but no node."""
    path = Path(sim_dir) / SIMULATION_FILE
    path.write_text(json.dumps({"devices": devices, "num_devices": num_devices, "data": data_to_flat(data),
                                "partition": asdict(partition)}))
    return path
