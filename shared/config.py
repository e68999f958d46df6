"""Fleet configs: YAML -> validated dataclasses, with every default in one place.

Unknown keys are errors (a typo must not silently fall back to a default). `docs/CONFIG.md` documents every key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared.errors import ConfigError

UPDATE_ENCODINGS = ("float16", "int8")  # the keys of shared.updates.UPDATE_FORMATS (which would import torch here)

DIRECTIONS = ("slow_to_fast", "fast_to_slow")
BUDGET_METRICS = ("params", "flops", "memory", "latency")
STRATEGIES = ("stitch", "stitch+behind", "stitch+front", "full")


@dataclass
class TrainConfig:
    """Optimiser settings (SGD with momentum and cosine decay, as in the paper's CNN protocol)."""

    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    augment: str = "none"  # none | shift (random 2-pixel shifts) | shift+flip (also horizontal flips)


@dataclass
class ModelConfig:
    name: str = ""
    kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    train: TrainConfig | None = None  # set -> train from scratch on the dataset when no checkpoint is given


@dataclass
class CalibrationConfig:
    examples: int = 256
    repeats: int = 1
    batch_size: int = 128


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits | cifar10 | cifar100 | imagefolder
    root: str | None = None
    download: bool = False
    image_size: int = 32
    channels: int = 3
    val_fraction: float = 0.2
    seed: int = 0
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@dataclass
class CatalogConfig:
    direction: str = "slow_to_fast"
    budget_metric: str = "params"
    budgets: list[float] = field(default_factory=list)  # empty -> `sweep` evenly spaced budgets
    sweep: int = 6
    init: str = "least_squares"  # least_squares | random
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, lr=0.05, weight_decay=0.0))
    strategy: str = "stitch"
    measure_latency: bool = True
    stitch_kernel_size: int = 1  # CNN->CNN stitches: 1 = pointwise (with bias), odd k = k x k conv (no bias)


@dataclass
class DeviceConfig:
    id: str = ""
    memory_mb: float = 0.0
    compute: float = 1.0  # relative compute score; 1.0 = the reference CPU
    latency_ms: float | None = None
    password: str | None = None


@dataclass
class BrokerConfig:
    url: str = "embedded"  # embedded | mqtt://host:port | mqtts://host:port
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    max_payload: int = 64 * 1024


@dataclass
class FleetConfig:
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    registry: str = "fleet.db"
    http_host: str = "127.0.0.1"
    http_port: int = 8780
    http_public_url: str | None = None  # base URL devices use for artifacts; default http(s)://host:port
    http_cert_file: str | None = None  # serve artifacts and the API over HTTPS with this certificate...
    http_key_file: str | None = None  # ...and key
    http_ca_file: str | None = None  # what devices trust for HTTPS (the coordinator's CA or self-signed cert)
    api_token: str | None = None  # required as `Authorization: Bearer` on POST /api/... when set
    catalog: str = "catalog"  # the catalog folder the coordinator serves
    device_root: str = "devices"  # where `restnet device(s)` keep each device's installed variant
    memory_margin: float = 0.2  # safety margin: a variant fits when (inference + fine-tune memory) x (1 + margin) <= device memory
    heartbeat_s: float = 10.0
    stale_after_s: float = 30.0
    devices: list[DeviceConfig] = field(default_factory=list)


@dataclass
class PartitionConfig:
    kind: str = "iid"  # iid | dirichlet
    alpha: float = 0.5
    seed: int = 0


@dataclass
class FederatedConfig:
    rounds: int = 3
    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    aggregation: str = "fedavg"  # fedavg | trimmed_mean | median
    update_encoding: str = "float16"  # float16 | int8: how devices send their change (shared.updates)
    norm_bound: float = 100.0  # max ||update|| relative to ||current weights||
    round_timeout_s: float = 120.0
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    superlink_port: int = 9091


@dataclass
class Config:
    name: str = "fleet"
    large: ModelConfig = field(default_factory=ModelConfig)
    small: ModelConfig = field(default_factory=ModelConfig)
    num_classes: int = 10
    data: DataConfig = field(default_factory=DataConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    source: str = ""  # the file it came from, for messages

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.data.channels, self.data.image_size, self.data.image_size)


def _build(cls, data: Any, where: str):
    """Recursively turn a mapping into dataclass `cls`, rejecting unknown keys and wrong types."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}", f"known keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(fields[name].type, value, f"{where}.{name}")
    return cls(**kwargs)


def _convert(type_str, value, where: str):
    nested = {
        "TrainConfig": TrainConfig, "ModelConfig": ModelConfig, "CalibrationConfig": CalibrationConfig,
        "DataConfig": DataConfig, "CatalogConfig": CatalogConfig, "BrokerConfig": BrokerConfig,
        "FleetConfig": FleetConfig, "PartitionConfig": PartitionConfig, "FederatedConfig": FederatedConfig,
    }
    t = str(type_str)
    base = t.split(" | ")[0]
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{where}: must not be empty")
    if base in nested:
        return _build(nested[base], value, where)
    if base == "list[DeviceConfig]":
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of devices")
        return [_build(DeviceConfig, v, f"{where}[{i}]") for i, v in enumerate(value)]
    try:
        if base == "int":
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if base == "dict":
            if not isinstance(value, dict):
                raise ValueError
            return value
        if base == "list[float]":
            return [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {base}, got {value!r}") from None
    raise AssertionError(f"unhandled config type {t}")


def _check(cfg: Config) -> None:
    def need(cond: bool, msg: str, hint: str = ""):
        if not cond:
            raise ConfigError(msg, hint)

    for role in ("large", "small"):
        m: ModelConfig = getattr(cfg, role)
        need(bool(m.name), f"{role}.name is required", "a timm model name such as resnet18 or cifar_vgg11")
    need(cfg.catalog.direction in DIRECTIONS, f"catalog.direction must be one of {DIRECTIONS}")
    need(cfg.catalog.budget_metric in BUDGET_METRICS, f"catalog.budget_metric must be one of {BUDGET_METRICS}")
    need(cfg.catalog.init in ("least_squares", "random"), "catalog.init must be least_squares or random")
    for where, t in (("large.train", cfg.large.train), ("small.train", cfg.small.train),
                     ("catalog.finetune", cfg.catalog.finetune)):
        if t is not None:
            need(t.augment in ("none", "shift", "shift+flip"), f"{where}.augment must be none, shift or shift+flip")
            need(t.epochs >= 0 and t.batch_size > 0 and t.lr > 0, f"{where}: epochs >= 0, batch_size > 0, lr > 0")
    need(cfg.catalog.strategy in STRATEGIES, f"catalog.strategy must be one of {STRATEGIES}")
    need(cfg.catalog.sweep >= 1 or bool(cfg.catalog.budgets), "catalog.sweep must be >= 1 when no budgets are given")
    need(all(b > 0 for b in cfg.catalog.budgets), "catalog.budgets must be positive")
    need(cfg.catalog.stitch_kernel_size >= 1 and cfg.catalog.stitch_kernel_size % 2 == 1,
         "catalog.stitch_kernel_size must be odd and >= 1 (1, 3, 5...)", "3 is the paper's CNN->CNN stitch")
    need(cfg.data.dataset in ("digits", "cifar10", "cifar100", "imagefolder"),
         "data.dataset must be digits, cifar10, cifar100 or imagefolder")
    need(cfg.data.dataset != "imagefolder" or bool(cfg.data.root), "data.root is required for imagefolder")
    need(0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction must be between 0 and 1")
    need(cfg.data.calibration.examples > 3, "data.calibration.examples must be > 3 (CKA needs n > 3)")
    need(cfg.num_classes >= 2, "num_classes must be >= 2")
    need(0.0 <= cfg.fleet.memory_margin < 1.0, "fleet.memory_margin must be in [0, 1)")
    ids = [d.id for d in cfg.fleet.devices]
    need(all(ids), "every fleet.devices entry needs an id")
    need(len(ids) == len(set(ids)), "fleet.devices ids must be unique")
    for d in cfg.fleet.devices:
        need(all(c.isalnum() or c in "-_" for c in d.id) and len(d.id) <= 64,
             f"device id {d.id!r} may only hold letters, digits, '-' and '_' (it is an MQTT topic level)")
        need(d.memory_mb > 0 and d.compute > 0, f"device {d.id}: memory_mb and compute must be positive")
    need(cfg.federated.aggregation in ("fedavg", "trimmed_mean", "median"),
         "federated.aggregation must be fedavg, trimmed_mean or median")
    need(cfg.federated.update_encoding in UPDATE_ENCODINGS,
         f"federated.update_encoding must be {' or '.join(UPDATE_ENCODINGS)}")
    need(cfg.federated.partition.kind in ("iid", "dirichlet"), "federated.partition.kind must be iid or dirichlet")
    need(cfg.federated.partition.alpha > 0, "federated.partition.alpha must be positive")


def load_config(path: str | Path) -> Config:
    """Read and validate a fleet config; every problem is a ConfigError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found", "see fleet_configs/ for examples")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    cfg = _build(Config, data or {}, path.name)
    cfg.source = str(path)
    _check(cfg)
    return cfg


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = _build(Config, data, source)
    cfg.source = source
    _check(cfg)
    return cfg
