"""Shared fixtures: a real (tiny) catalog built by the real pipeline on the offline digits data; a real PostgreSQL."""
from __future__ import annotations

import copy
import os

import pytest

# Tests never download: the offline error path of `pretrained: true` must answer at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread per process (torch reads it at import; the processes tests start inherit it): tests run many processes
# side by side on 2 cores, where more threads per process only fight each other (measured: the model-family tests
# took 318 s with 2 threads on a loaded machine, 39 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_CONFIG = {
    "name": "tiny",
    "num_classes": 10,
    "large": {"name": "cifar_vgg13", "kwargs": {"width": 0.125}, "train": {"epochs": 4, "lr": 0.05, "batch_size": 64}},
    "small": {"name": "cifar_vgg11", "kwargs": {"width": 0.125}, "train": {"epochs": 4, "lr": 0.05, "batch_size": 64}},
    "data": {"dataset": "digits", "image_size": 32, "channels": 1, "calibration": {"examples": 128, "repeats": 2}},
    "catalog": {"budget_metric": "params", "sweep": 4, "measure_latency": True,
                "finetune": {"epochs": 2, "lr": 0.02, "weight_decay": 0.0, "batch_size": 64}},
}


def tiny_config_dict() -> dict:
    return copy.deepcopy(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory):
    """A catalog folder (catalog.json, cka.json, blobs/, manifests/) with at least two variants."""
    from shared.build import build_catalog
    from shared.config import parse_config

    out = tmp_path_factory.mktemp("tiny-catalog")
    report = build_catalog(parse_config(tiny_config_dict(), "tiny"), out, progress=False, log=lambda m: None)
    assert len(report.catalog.variants) >= 2, "the tiny config must yield at least two variants"
    return report.catalog


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL for the session (started on first use); each test takes a database of its own."""
    from postgres_server import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()
