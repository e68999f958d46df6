"""`restnet demo` end to end with its own config (fleet_configs/demo.yaml, two federated rounds instead of three)
and real processes: embedded broker, coordinator, SuperLink, SuperNodes. Checks the catalog as delivered (it rises
with size), who gets what, the table, the plots, and that nothing is left running."""
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

from restnet.demo import DEFAULT_CONFIG
from shared.catalog import Catalog
from shared.experiments import spearman
from shared.messages import Profile
from tests.fleet_helpers import assert_assignment_ok, fits

# Real Flower processes: minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


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
    """The demo as shipped, two rounds: it builds its catalog (on one thread, as on any machine), then runs."""
    root = tmp_path_factory.mktemp("demo")
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["federated"]["rounds"] = 2
    config = root / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = run_demo(config, root / "out")
    out, err = proc.communicate(timeout=1500)
    return {"code": proc.returncode, "stdout": out, "stderr": err, "root": root, "config": config, "cfg": cfg,
            "pid": proc.pid}


def delivered(demo_run) -> Catalog:
    return Catalog.load(demo_run["root"] / "out" / "catalog-base")  # what the coordinator assigned from


def test_demo_runs_to_the_end_and_prints_every_device(demo_run):
    assert demo_run["code"] == 0, demo_run["stderr"][-3000:]
    table = demo_run["stdout"]
    for dev in demo_run["cfg"]["fleet"]["devices"]:
        assert dev["id"] in table
    assert "acc after FL" in table and "acc delivered" in table


def test_the_demo_prints_the_peak_memory_of_its_whole_process_tree(demo_run):
    """Sampled over every process the demo started (SuperLink, SuperNodes, the ServerApp)."""
    assert "peak memory of the demo's" in demo_run["stdout"] and "sum of PSS" in demo_run["stdout"]
    memory = json.loads((demo_run["root"] / "out" / "demo.json").read_text())["memory"]
    assert memory["processes"] > 1 + len(demo_run["cfg"]["fleet"]["devices"])  # the demo, SuperLink, SuperNodes
    assert memory["peak_rss_bytes"] > memory["peak_pss_bytes"] > 0  # torch's shared pages count once in PSS


def test_every_devices_rounds_ran_in_the_demos_own_process(demo_run):
    """The devices' ClientApps are hosted by their agents (`client.clientapp_host`), here all in the demo's
    process: no ClientApp process per message, torch imported once, each variant loaded once."""
    entries = [json.loads(line) for path in (demo_run["root"] / "out" / "run" / "devices").glob("*/fl_history.jsonl")
               for line in path.read_text().splitlines()]
    assert len(entries) == 2 * len(demo_run["cfg"]["fleet"]["devices"])
    assert {(e["pid"], e["hosted"]) for e in entries} == {(demo_run["pid"], True)}
    assert all(e["front_cached"] for e in entries if e["round"] == 2)


def test_the_catalog_rises_with_size_as_delivered(demo_run):
    """Before any federated round: accuracy follows size (Spearman >= 0.8), no variant falls more than two
    validation examples below a smaller one, and the largest comes within about a point of the large model."""
    catalog = delivered(demo_run)
    variants = sorted(catalog.variants, key=lambda v: v.params)
    assert len(variants) >= 4
    params, accs = [v.params for v in variants], [v.accuracy for v in variants]
    assert spearman(params, accs) >= 0.8, list(zip(params, accs))
    example = 1 / 359  # the digits validation split
    for k in range(1, len(accs)):
        assert accs[k] >= max(accs[:k]) - 2 * example + 1e-9, (variants[k].id, accs)
    large = max((catalog.front, catalog.behind), key=lambda m: m.params)
    assert accs[-1] >= large.accuracy - 0.0125 and accs[-1] == max(accs)
    report = json.loads((demo_run["root"] / "out" / "demo.json").read_text())
    assert [v["accuracy"] for v in report["catalog"]["variants"]] == accs
    assert report["catalog"]["spearman"] == pytest.approx(spearman(params, accs))
    assert "catalog as delivered" in demo_run["stdout"]


def test_more_memory_gets_a_larger_more_accurate_variant_and_the_most_the_largest_it_holds(demo_run):
    catalog = delivered(demo_run)
    margin = demo_run["cfg"]["fleet"]["memory_margin"]
    report = json.loads((demo_run["root"] / "out" / "demo.json").read_text())
    rows = sorted(report["devices"], key=lambda r: r["memory_mb"])
    assert len(rows) == 6 and all(r["variant"] for r in rows)
    for row in rows:
        rec = catalog.get(row["variant"])
        assert (rec.memory_bytes + rec.finetune_memory_bytes) * (1 + margin) <= row["memory_mb"] * 2**20
        assert_assignment_ok(catalog, Profile(row["memory_mb"], row["compute"], agent_version="test"), row["variant"],
                             margin)
    for a, b in zip(rows, rows[1:]):
        ra, rb = catalog.get(a["variant"]), catalog.get(b["variant"])
        assert ra.params <= rb.params and ra.accuracy <= rb.accuracy
    assert len({catalog.get(r["variant"]).params for r in rows}) == 3  # three budgets, three variants
    most = [r for r in rows if r["memory_mb"] == rows[-1]["memory_mb"]]
    for row in most:
        profile = Profile(row["memory_mb"], row["compute"], agent_version="test")
        largest = max((v for v in catalog.variants if fits(v, profile, margin)), key=lambda v: v.params)
        assert row["variant"] == largest.id


def test_federated_rounds_run_and_never_publish_a_worse_stitch(demo_run):
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
    """A second run reuses the catalog; interrupt it once the devices are enrolling. Ctrl-C as from a terminal: a
    suite started in the background by a shell without job control inherits SIGINT ignored, and Python then turns
    no SIGINT into KeyboardInterrupt, so the child gets the default disposition back."""
    proc = run_demo(demo_run["config"], demo_run["root"] / "out",
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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

    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    base = config_digest(parse_config(cfg, "test"))
    cfg["fleet"]["devices"][0]["memory_mb"] = 99.0
    cfg["federated"]["rounds"] = 7
    assert config_digest(parse_config(cfg, "test")) == base
    cfg["catalog"]["sweep"] = 4
    assert config_digest(parse_config(cfg, "test")) != base
