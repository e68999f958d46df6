"""Fleet configs: YAML -> validated dataclasses (pydantic), with every default in one place.

Unknown keys are errors (a typo must not silently fall back to a default), and so is a bool where a number
belongs, a non-finite number, or a choice outside its vocabulary (`shared.vocabulary`). Every problem is one
ConfigError naming the key. `docs/CONFIG.md` documents every key.
"""
from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, StrictBool, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError
from pydantic.dataclasses import dataclass

from shared.errors import ConfigError
from shared.vocabulary import (AGGREGATIONS, AUGMENTATIONS, BUDGET_METRICS, CKA_ESTIMATORS, DATASETS, DIRECTIONS,
                               PARTITIONS, STITCH_INITS, STRATEGIES, UPDATE_FORMATS, valid_device_id)


def _not_bool(value):
    """YAML's true/false are not numbers (pydantic would read them as 1 and 0)."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_type_for_number", "a number, not true/false")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Direction = Literal[DIRECTIONS]
BudgetMetric = Literal[BUDGET_METRICS]
Dataset = Literal[DATASETS]
StitchInit = Literal[STITCH_INITS]
CKAEstimator = Literal[CKA_ESTIMATORS]
Augmentation = Literal[AUGMENTATIONS]
Strategy = Literal[STRATEGIES]
Aggregation = Literal[AGGREGATIONS]
Partition = Literal[PARTITIONS]
UpdateEncoding = Literal[tuple(UPDATE_FORMATS)]

# Every section: unknown keys rejected, numbers finite, a number given for a text (a device id 7) taken as text.
_section = dataclass(config=ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True))


@_section
class TrainConfig:
    """Optimiser settings (SGD with momentum and cosine decay, as in the paper's CNN protocol)."""

    epochs: Int = 10
    lr: Float = 0.05
    momentum: Float = 0.9
    weight_decay: Float = 5e-4
    batch_size: Int = 64
    augment: Augmentation = "none"  # none | shift (random 2-pixel shifts) | shift+flip (also horizontal flips)


@_section
class ModelConfig:
    name: str = ""
    kwargs: dict = field(default_factory=dict)
    pretrained: StrictBool = False
    checkpoint: str | None = None
    train: TrainConfig | None = None  # set -> train from scratch on the dataset when no checkpoint is given


@_section
class CalibrationConfig:
    examples: Int = 256
    repeats: Int = 1
    batch_size: Int = 128
    estimator: CKAEstimator = "unbiased"  # unbiased (minibatch HSIC_u) | paper (biased HSIC, CKA averaged over repeats)


@_section
class DataConfig:
    dataset: Dataset = "digits"
    root: str | None = None
    download: StrictBool = False
    image_size: Int = 32
    channels: Int = 3
    val_fraction: Float = 0.2
    seed: Int = 0
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@_section
class CatalogConfig:
    direction: Direction = "slow_to_fast"
    budget_metric: BudgetMetric = "params"
    budgets: list[Float] = field(default_factory=list)  # empty -> `sweep` evenly spaced budgets
    sweep: Int = 6
    init: StitchInit = "least_squares"
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, lr=0.05, weight_decay=0.0))
    strategy: Strategy = "stitch"
    measure_latency: StrictBool = True
    stitch_kernel_size: Int = 1  # CNN->CNN stitches: 1 = pointwise (with bias), odd k = k x k conv (no bias)


@_section
class DeviceConfig:
    id: str = ""
    memory_mb: Float = 0.0
    compute: Float = 1.0  # relative compute score; 1.0 = the reference CPU
    latency_ms: Float | None = None
    password: str | None = None
    storage_mb: Float | None = None  # MiB for a ladder's blocks; None: one variant, as before ladders


@_section
class BrokerConfig:
    url: str = "embedded"  # embedded | mqtt://host:port | mqtts://host:port
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    max_payload: Int = 64 * 1024


@_section
class ClusterConfig:
    """Several coordinators serving one fleet (docs/DEPLOY.md, "A coordinator cluster")."""

    coordinators: Int = 1  # > 1: MQTT 5 shared subscriptions, a PostgreSQL registry, an external broker
    share_group: str = "restnet"  # the shared-subscription group: $share/<group>/fleet/v1/dev/+/<kind>
    session_expiry_s: Int = 60  # how long the broker keeps a coordinator's session (and its share) after it left


@_section
class FleetConfig:
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    registry: str = "fleet.db"  # a SQLite path, sqlite:///path or postgresql://user@host:port/database
    http_host: str = "127.0.0.1"
    http_port: Int = 8780
    http_public_url: str | None = None  # base URL devices use for artifacts; default http(s)://host:port
    http_cert_file: str | None = None  # serve artifacts and the API over HTTPS with this certificate...
    http_key_file: str | None = None  # ...and key
    http_ca_file: str | None = None  # what devices trust for HTTPS (the coordinator's CA or self-signed cert)
    api_token: str | None = None  # required as `Authorization: Bearer` on POST /api/... when set
    signing_key: str | None = None  # the coordinator's Ed25519 private key: signs desired states and manifests
    trusted_keys: list[str] = field(default_factory=list)  # public keys devices accept signatures from
    catalog: str = "catalog"  # the catalog folder the coordinator serves
    device_root: str = "devices"  # where `restnet device(s)` keep each device's installed variant
    memory_margin: Float = 0.2  # safety margin: a variant fits when (inference + fine-tune memory) x (1 + margin) <= device memory
    heartbeat_s: Float = 10.0
    stale_after_s: Float = 30.0
    devices: list[DeviceConfig] = field(default_factory=list)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def coordinator_login(self, instance: int = 1) -> str:
        """MQTT user name and client id of coordinator `instance` (1..cluster.coordinators): the first keeps
        `broker.username` (and so its session when a cluster grows), the others add `-<instance>`."""
        base = self.broker.username or "restnet-coordinator"
        return base if instance == 1 else f"{base}-{instance}"

    def public_url(self, port: int | None = None) -> str:
        """The base URL devices and tools reach the coordinator's HTTP side at: `http_public_url`, else
        http(s)://host:port on the port actually bound (a wildcard host means this machine)."""
        if self.http_public_url:
            return self.http_public_url.rstrip("/")
        host = "127.0.0.1" if self.http_host in ("0.0.0.0", "", "::") else self.http_host
        return f"{'https' if self.http_cert_file else 'http'}://{host}:{port or self.http_port}"


@_section
class PartitionConfig:
    kind: Partition = "iid"
    alpha: Float = 0.5
    seed: Int = 0


@_section
class FederatedConfig:
    rounds: Int = 3
    local_epochs: Int = 1
    lr: Float = 0.05
    batch_size: Int = 32
    aggregation: Aggregation = "fedavg"
    update_encoding: UpdateEncoding = "float16"  # how devices send their change (shared.updates)
    trim_fraction: Float = 0.2  # trimmed_mean: the share of largest and of smallest values dropped per coordinate
    norm_bound: Float = 100.0  # max ||update|| relative to ||current weights||
    round_timeout_s: Float = 120.0  # a node that has not answered a training request by then sits the round out
    query_timeout_s: Float = 30.0  # the same for the question "which variant do you run?"
    wait_nodes_timeout_s: Float = 60.0  # before round 1: how long to wait for the expected nodes to connect
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    superlink_port: Int = 9091


@_section
class Config:
    name: str = "fleet"
    large: ModelConfig = field(default_factory=ModelConfig)
    small: ModelConfig = field(default_factory=ModelConfig)
    num_classes: Int = 10
    data: DataConfig = field(default_factory=DataConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    source: str = ""  # the file it came from, for messages

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.data.channels, self.data.image_size, self.data.image_size)


def _check(cfg: Config) -> None:
    """The rules between keys and on values, past what the types say."""
    def need(cond: bool, msg: str, hint: str = ""):
        if not cond:
            raise ConfigError(msg, hint)

    for role in ("large", "small"):
        m: ModelConfig = getattr(cfg, role)
        need(bool(m.name), f"{role}.name is required", "a timm model name such as resnet18 or cifar_vgg11")
    for where, t in (("large.train", cfg.large.train), ("small.train", cfg.small.train),
                     ("catalog.finetune", cfg.catalog.finetune)):
        if t is not None:
            need(t.epochs >= 0 and t.batch_size > 0 and t.lr > 0, f"{where}: epochs >= 0, batch_size > 0, lr > 0")
    need(cfg.catalog.sweep >= 1 or bool(cfg.catalog.budgets), "catalog.sweep must be >= 1 when no budgets are given")
    need(all(b > 0 for b in cfg.catalog.budgets), "catalog.budgets must be positive")
    need(cfg.catalog.stitch_kernel_size >= 1 and cfg.catalog.stitch_kernel_size % 2 == 1,
         "catalog.stitch_kernel_size must be odd and >= 1 (1, 3, 5...)", "3 is the paper's CNN->CNN stitch")
    need(cfg.data.dataset != "imagefolder" or bool(cfg.data.root), "data.root is required for imagefolder")
    need(0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction must be between 0 and 1")
    need(cfg.data.calibration.examples > 3, "data.calibration.examples must be > 3 (CKA needs n > 3)")
    need(cfg.num_classes >= 2, "num_classes must be >= 2")
    need(0.0 <= cfg.fleet.memory_margin < 1.0, "fleet.memory_margin must be in [0, 1)")
    ids = [d.id for d in cfg.fleet.devices]
    need(all(ids), "every fleet.devices entry needs an id")
    need(len(ids) == len(set(ids)), "fleet.devices ids must be unique")
    for d in cfg.fleet.devices:
        need(valid_device_id(d.id),
             f"device id {d.id!r} may only hold letters, digits, '-' and '_' (it is an MQTT topic level)")
        need(d.memory_mb > 0 and d.compute > 0, f"device {d.id}: memory_mb and compute must be positive")
        need(d.storage_mb is None or 0 < d.storage_mb <= 1e9, f"device {d.id}: storage_mb must be in (0, 1e9] MiB")
    cluster = cfg.fleet.cluster
    need(cluster.coordinators >= 1, "fleet.cluster.coordinators must be >= 1")
    need(valid_device_id(cluster.share_group),
         "fleet.cluster.share_group may only hold letters, digits, '-' and '_' (it is an MQTT topic level)")
    need(cluster.session_expiry_s >= 0, "fleet.cluster.session_expiry_s must be >= 0")
    need(cfg.federated.partition.alpha > 0, "federated.partition.alpha must be positive")
    need(0.0 <= cfg.federated.trim_fraction < 0.5, "federated.trim_fraction must be in [0, 0.5)")


def load_config(path: str | Path) -> Config:
    """Read and validate a fleet config; every problem is a ConfigError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found", "see fleet_configs/ for examples")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    return parse_config(data or {}, path.name)


def parse_config(data: Any, source: str) -> Config:
    """A fleet config from plain data (as YAML gives it); `source` names it in errors."""
    try:
        cfg = _CONFIG.validate_python(data)
    except ValidationError as exc:
        raise _config_error(exc, source) from None
    cfg.source = source
    _check(cfg)
    return cfg


_CONFIG = TypeAdapter(Config)


def _config_error(exc: ValidationError, source: str) -> ConfigError:
    """pydantic's first problem as one line naming the key, e.g. `fleet.yaml.data.image_size: expected int`."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = _key(source, first["loc"])
    kind, value = first["type"], first.get("input")
    if kind == "unexpected_keyword_argument":
        parent = first["loc"][:-1]
        unknown = sorted(str(e["loc"][-1]) for e in errors
                         if e["type"] == "unexpected_keyword_argument" and e["loc"][:-1] == parent)
        return ConfigError(f"{_key(source, parent)}: unknown key(s) {', '.join(unknown)}",
                           "see docs/CONFIG.md for the keys")
    if kind == "literal_error":
        return ConfigError(f"{where} must be one of {first['ctx']['expected']}, got {value!r}")
    if kind in ("dataclass_type", "dict_type", "dataclass_args_type"):
        return ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    if value is None:
        return ConfigError(f"{where}: must not be empty")
    expected = {"int": "int", "float": "float", "bool_type_for": "a number", "bool": "bool", "string": "str",
                "list": "a list", "finite": "a finite number"}
    what = next((v for k, v in expected.items() if kind.startswith(k)), None)
    if what is None:
        return ConfigError(f"{where}: {first['msg']}, got {value!r}")
    return ConfigError(f"{where}: expected {what}, got {value!r}")


def _key(source: str, loc: tuple) -> str:
    """A key's path as the user wrote it: `fleet.yaml.fleet.devices[0].id`."""
    return "".join([source, *(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)])
