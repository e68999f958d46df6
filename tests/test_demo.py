"""A shortened `restnet demo`, end to end with real processes: embedded broker, coordinator, SuperLink,
SuperNodes, federated rounds. Checks the table's content, the plots, and that nothing is left running."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from shared.catalog import Catalog
from shared.messages import Profile
from tests.conftest import tiny_config_dict
from tests.fleet_helpers import assert_assignment_ok

# Real Flower processes: minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def demo_config(tmp_path: Path) -> dict:
    cfg = tiny_config_dict()
    cfg["catalog"].update({"sweep": 3, "finetune": {"epochs": 0}, "measure_latency": False})
    cfg["fleet"] = {"memory_margin": 0.2, "devices": [
        {"id": "small-1", "memory_mb": 1.0, "compute": 1.0},  # resized below to fit only the cheapest variant
        {"id": "small-2", "memory_mb": 1.0, "compute": 1.0},
        {"id": "big-1", "memory_mb": 64.0, "compute": 2.0},
        {"id": "big-2", "memory_mb": 64.0, "compute": 2.0},
    ]}
    cfg["federated"] = {"rounds": 2, "local_epochs": 1, "lr": 0.02, "batch_size": 32,
                        "partition": {"kind": "dirichlet", "alpha": 1.0, "seed": 0}}
    return cfg


MARK = f"RESTNET_TEST_RUN={uuid.uuid4().hex}"  # in the environment of every process this module starts


def flower_processes() -> dict[int, str]:
    """Flower and broker processes that this module's demos started (they and their children inherit MARK in their
    environment; other sessions' processes on the machine do not count), by pid with their command lines."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if MARK.encode() not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(name in cmd for name in ("flower-superlink", "flower-supernode", "flower-superexec",
                                        "flwr-serverapp", "flwr-clientapp", "bin/flwr ", "rumqttd", "iotcore")):
            found[int(proc.name)] = cmd
    return found


def wait_gone(timeout: float = 30.0) -> dict[int, str]:
    """Our processes still alive after `timeout` seconds, by pid with command line."""
    deadline = time.monotonic() + timeout
    while True:
        left = flower_processes()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def run_demo(config: Path, out: Path, *extra: str, **popen) -> subprocess.Popen:
    key, value = MARK.split("=")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", key: value}
    return subprocess.Popen([sys.executable, "-m", "restnet.cli", "demo", "--config", str(config), "--out", str(out),
                             "--http-port", "0", "--broker-port", "0", "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Build the catalog once (to size the small devices to its cheapest variant), then run the demo."""
    from shared.build import build_catalog
    from shared.config import parse_config

    from restnet.demo import config_digest

    root = tmp_path_factory.mktemp("demo")
    cfg = demo_config(root)
    base = root / "out" / "catalog-base"  # where the demo keeps its catalog; it reuses one built from its config
    probe = build_catalog(parse_config(cfg, "probe"), base, progress=False, log=lambda m: None).catalog
    needs = sorted((v.memory_bytes + v.finetune_memory_bytes) * 1.2 / 2**20 for v in probe.variants)
    small = needs[0] + 0.25 * (needs[1] - needs[0]) if len(needs) > 1 else needs[0] * 1.01
    for dev in cfg["fleet"]["devices"][:2]:
        dev["memory_mb"] = round(small, 4)
    config = root / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    (base / ".config-digest").write_text(config_digest(parse_config(cfg, "test")))  # the fleet part is not hashed
    proc = run_demo(config, root / "out")
    out, err = proc.communicate(timeout=900)
    return {"code": proc.returncode, "stdout": out, "stderr": err, "root": root, "config": config, "cfg": cfg}


def test_demo_runs_to_the_end_and_prints_every_device(demo_run):
    assert demo_run["code"] == 0, demo_run["stderr"][-3000:]
    table = demo_run["stdout"]
    for dev in demo_run["cfg"]["fleet"]["devices"]:
        assert dev["id"] in table
    assert "acc after FL" in table and "acc delivered" in table


def test_every_device_got_the_best_variant_within_its_budget(demo_run):
    report = json.loads((demo_run["root"] / "out" / "demo.json").read_text())
    delivered = Catalog.load(demo_run["root"] / "out" / "catalog-base")  # what the coordinator assigned from
    margin = demo_run["cfg"]["fleet"]["memory_margin"]
    assert len(report["devices"]) == 4
    for row in report["devices"]:
        assert row["variant"], f"{row['device']} got no variant"
        rec = delivered.get(row["variant"])
        assert (rec.memory_bytes + rec.finetune_memory_bytes) * (1 + margin) <= row["memory_mb"] * 2**20
        assert_assignment_ok(delivered, Profile(row["memory_mb"], row["compute"], agent_version="test"), row["variant"], margin)
    small = {r["variant"] for r in report["devices"] if r["device"].startswith("small")}
    cheapest = min(delivered.variants, key=lambda v: v.memory_bytes + v.finetune_memory_bytes)
    assert small == {cheapest.id}  # sized so that only the cheapest variant fits


def test_accuracy_after_federated_rounds_is_at_least_as_delivered(demo_run):
    report = json.loads((demo_run["root"] / "out" / "demo.json").read_text())
    for row in report["devices"]:
        assert row["accuracy_after"] >= row["accuracy_delivered"], row
        assert row["version_now"] >= row["version_delivered"]
    rounds = {(r["round"], r["variant_id"]) for r in report["rounds"]}
    assert {rnd for rnd, _ in rounds} == {1, 2}


def test_plots_are_written(demo_run):
    for name in ("cka.png", "frontier.png", "rounds.png"):
        path = demo_run["root"] / "out" / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_process_is_left_running(demo_run):
    assert wait_gone() == {}


def test_ctrl_c_stops_every_process(demo_run):
    """A second run reuses the catalog; interrupt it once the devices are enrolling."""
    proc = run_demo(demo_run["config"], demo_run["root"] / "out")
    seen = ""
    deadline = time.monotonic() + 300
    while "enrolling" not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += proc.stderr.readline()
    assert "reusing the catalog" in seen
    time.sleep(3)  # let SuperNodes start
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert wait_gone() == {}


def test_the_catalog_is_rebuilt_only_when_its_own_settings_change():
    from restnet.demo import config_digest
    from shared.config import parse_config

    cfg = demo_config(Path("."))
    base = config_digest(parse_config(cfg, "test"))
    cfg["fleet"]["devices"][0]["memory_mb"] = 99.0
    cfg["federated"]["rounds"] = 7
    assert config_digest(parse_config(cfg, "test")) == base
    cfg["catalog"]["sweep"] = 4
    assert config_digest(parse_config(cfg, "test")) != base
