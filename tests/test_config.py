"""Fleet configs: every shipped config loads; mistakes are one clear ConfigError naming the key."""
from pathlib import Path

import pytest

from shared.config import load_config
from shared.errors import ConfigError

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("fleet_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.large.name and cfg.small.name


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "large: {name: cifar_vgg19}\nsmall: {name: cifar_vgg11}\n"


@pytest.mark.parametrize("text, match", [
    (BASE + "catalog: {budget_metirc: params}\n", r"unknown key\(s\) budget_metirc"),
    (BASE + "catalog: {budget_metric: watts}\n", "budget_metric must be one of"),
    (BASE + "data: {image_size: big}\n", r"data.image_size: expected int"),
    (BASE + "data: {calibration: {examples: 3}}\n", "CKA needs n > 3"),
    ("small: {name: cifar_vgg11}\n", "large.name is required"),
    (BASE + "fleet: {devices: [{id: 'a/b', memory_mb: 10}]}\n", "MQTT topic level"),
    (BASE + "fleet: {devices: [{id: a, memory_mb: 10}, {id: a, memory_mb: 5}]}\n", "unique"),
    (BASE + "large: [1, 2\n", "not valid YAML"),
    (BASE + "catalog: {sweep: true}\n", r"catalog.sweep: expected a number, got True"),
    (BASE + "data: {val_fraction: .nan}\n", r"data.val_fraction: expected a finite number"),
    (BASE + "fleet: {devices: [{id: a, memory: 10}]}\n", r"fleet.devices\[0\]: unknown key\(s\) memory"),
    (BASE + "federated: {aggregation: mean}\n", "federated.aggregation must be one of 'fedavg'"),
    (BASE + "large: {name: x, pretrained: 1}\n", "large.pretrained: expected bool"),
    (BASE + "fleet: {devices: [{id: é, memory_mb: 10}]}\n", "MQTT topic level"),
    (BASE + "catalog: {stitch_kernel_size: 2}\n", "stitch_kernel_size must be odd"),
    (BASE + "catalog: {stitch_kernel_size: 0}\n", "stitch_kernel_size must be odd"),
    (BASE + "data: {dataset: cifar1000}\n", "'digits', 'cifar10', 'cifar100' or 'imagefolder'"),
])
def test_bad_configs_name_the_problem(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
