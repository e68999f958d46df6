"""`restnet demo --pressure` end to end with real processes (embedded broker, coordinator, SuperLink, SuperNodes):
the roomiest device holds a ladder; its memory limit (cgroup-v2 files the demo writes) is squeezed and released; the
demo's table and demo.json show the coordinator's view stepping down and back up, with no byte downloaded.

A smaller setup than the shipped demo: the shipped demo first trains its two base models and fine-tunes its
catalog (minutes on a loaded 2-core machine, and its frontier depends on that training), so this test puts the
fleet tests' synthetic catalog (three variants, hand-chosen accuracies: all on the frontier) where the demo keeps
its built catalog, stamped with the config's digest so the demo reuses it, and runs two devices.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config_dict
from fleet_helpers import _synthetic_catalog_template  # noqa: F401

from restnet.demo import config_digest
from shared.config import parse_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_pressure_steps_one_device_down_and_back_up(tmp_path, _synthetic_catalog_template):
    cfg = tiny_config_dict()
    cfg["fleet"] = {"broker": {"url": "embedded"}, "memory_margin": 0.2,
                    "devices": [{"id": "hub-01", "memory_mb": 200, "compute": 1.0},
                                {"id": "cam-01", "memory_mb": 20, "compute": 1.0}]}
    config = tmp_path / "pressure.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    shutil.copytree(_synthetic_catalog_template, out / "catalog-base")
    (out / "catalog-base" / ".config-digest").write_text(config_digest(parse_config(cfg, "pressure")))
    proc = subprocess.run([sys.executable, "-m", "restnet.cli", "demo", "--config", str(config), "--out", str(out),
                           "--http-port", "0", "--broker-port", "0", "--quiet", "--pressure"],
                          capture_output=True, text=True, timeout=540, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing the catalog" in proc.stderr
    steps = json.loads((out / "demo.json").read_text())["pressure"]
    assert steps["device"] == "hub-01"
    rows = steps["steps"]
    assert [r["step"] for r in rows] == ["roomy", "squeezed", "released"]
    assert [r["shown"] for r in rows] == ["syn.4_4", "syn.1_3", "syn.4_4"]  # the coordinator's view (status page)
    assert [(r["rung"], r["of"]) for r in rows] == [(1, 3), (3, 3), (1, 3)]
    assert all(r["bytes_downloaded"] == 0 for r in rows)
    assert rows[2]["seconds"] >= 3.0  # back up only after the hold time (restnet/pressure.py HOLD_S)
    table = proc.stdout
    assert "memory pressure on hub-01" in table
    for r in rows:
        assert r["step"] in table and f"{r['rung']} of 3" in table
