"""A device's local data, described by flat key/values that fit a Flower node config (or run config).

A simulated device holds one partition of the dataset's training split (IID, or non-IID by a Dirichlet(alpha)
per class); every device computes the same partitioning from the same seed and keeps only its own part. A real
device with its own data uses `num-partitions = 1`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from shared.config import DataConfig, PartitionConfig
from shared.errors import ConfigError

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

    def load_train_partition(self):
        """This device's share of the training split, as a TensorDataset."""
        # Imported here: torch costs seconds, and a ClientApp process that only answers a query never needs it.
        from torch.utils.data import TensorDataset

        from shared.datasets import load_splits, partition_indices

        train, _ = load_splits(self.data)
        labels = train.tensors[1].numpy()
        parts = partition_indices(labels, self.num_partitions, self.partition.kind, self.partition.alpha,
                                  self.partition.seed)
        idx = parts[self.partition_id]
        return TensorDataset(*(t[idx] for t in train.tensors))
