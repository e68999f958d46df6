"""The fleet status view: `restnet status` and the coordinator's page at `/`, in a real headless chromium.

A real embedded broker, coordinator and device agents; one hand-driven device reports a failure whose reason is
hostile HTML, which the page must show as text. The page is rendered in one place, the browser, from the JSON API:
as served it holds no fleet data (a browser without scripts gets pointers to the API and `restnet status`);
chromium runs two ways: `--dump-dom` (the page its script rendered), and driven over its DevTools pipe, so the
test can change the fleet while the page stays open and watch the page follow without a reload.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from html.parser import HTMLParser

import pytest
from fleet_helpers import (DEVICES, _synthetic_catalog_template, device_agents, embedded_broker_url,  # noqa: F401
                           fleet_config, fleet_coordinator, free_port, http, raw_clients, synthetic_catalog,
                           wait_until, write_config)

from client.fleet_sim import wait_settled
from restnet.cli import main as restnet
from shared.messages import Enroll, Profile, Status, decode_desired, encode, topic

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">&amp;"

needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs chromium (apt install chromium)")


# ---- a fleet with a hostile device ----------------------------------------------------------------------------

@pytest.fixture
def fleet(tmp_path, embedded_broker_url, synthetic_catalog, fleet_coordinator, device_agents):
    """(fleet config, coordinator, agents) with the three configured devices installed."""
    cfg = fleet_config(tmp_path, embedded_broker_url)
    coordinator = fleet_coordinator(cfg, synthetic_catalog)
    agents = [device_agents(cfg, d) for d in DEVICES]
    assert not wait_settled(agents, 60)
    return cfg, coordinator, agents


def enroll_hostile_device(cfg, coordinator, raw_clients, device_id: str = "dev-evil") -> None:
    """A device that enrolls and then reports FAILED with HTML in its reason (printable, so the schema takes it)."""
    client = raw_clients(cfg.broker.url, device_id)
    assert not client.connect().is_failure
    client.subscribe(topic(device_id, "desired"))
    client.publish(topic(device_id, "enroll"), encode(Enroll(device_id, "req-1", Profile(20.0, 1.0, None, agent_version="x"))))
    message = client.next_message(10)
    assert message is not None
    desired = decode_desired(device_id, message[1])
    client.publish(topic(device_id, "status"), encode(Status(device_id, desired.assignment_id, "FAILED",
                                                             desired.assignment.variant_id, HOSTILE)))
    assert wait_until(lambda: coordinator.registry.device(device_id).state == "failed")


# ---- chromium ---------------------------------------------------------------------------------------------------

def _stop_group(proc: subprocess.Popen) -> None:
    """Chromium forks helpers (zygote, renderers): end its whole process group, which we created."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def dump_dom(url: str, profile_dir, *extra: str) -> str:
    proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "--virtual-time-budget=5000",
                             *extra, "--dump-dom", url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        _stop_group(proc)
    assert proc.returncode == 0 and out.strip(), f"chromium failed with {proc.returncode}"
    return out


class DevTools:
    """Headless chromium over `--remote-debugging-pipe` (it reads commands on fd 3, answers on fd 4): stdlib only."""

    def __init__(self, profile_dir):
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()
        # Park the child's ends at fds >= 10, so a tiny exec wrapper can move them to 3 and 4 without clobbering.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome, from_chrome)]
        os.close(to_chrome)
        os.close(from_chrome)
        wrapper = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
                   "os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", wrapper, *map(str, ends), CHROMIUM,
                                      *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "--remote-debugging-pipe"],
                                     pass_fds=ends, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        for fd in ends:
            os.close(fd)
        self._buffer, self._next_id, self.session = b"", 0, None

    def call(self, method: str, params: dict | None = None, timeout: float = 20.0) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:  # anything else is an event: not needed here
                    assert "error" not in reply, reply["error"]
                    return reply["result"]
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self._in], [], [], left)[0], f"chromium did not answer {method}"
            chunk = os.read(self._in, 1 << 16)
            assert chunk, "chromium closed its DevTools pipe"
            self._buffer += chunk

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"].get("value")

    def close(self) -> None:
        _stop_group(self.proc)
        os.close(self._in)
        os.close(self._out)


# ---- reading the page ---------------------------------------------------------------------------------------

class _Tables(HTMLParser):
    """The text of every cell of every <tbody id=...>, row by row: {"devices": [[cell, ...], ...], ...}."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._body = self._row = None

    def handle_starttag(self, tag, attrs):
        if tag == "tbody":
            self._body = self.tables.setdefault(dict(attrs).get("id", ""), [])
        elif tag == "tr" and self._body is not None:
            self._row = []
            self._body.append(self._row)
        elif tag == "td" and self._row is not None:
            self._row.append("")

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._body = self._row = None

    def handle_data(self, data):
        if self._row:
            self._row[-1] += data


def tables(page: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def by_device(page: str) -> dict[str, list[str]]:
    return {row[0]: row for row in tables(page)["devices"]}


def assert_shows_fleet(page: str, coordinator, catalog) -> None:
    """Every enrolled device with its presence, state, variant and version; every variant with its user count."""
    rows = by_device(page)
    snapshot = coordinator.devices()
    assert set(rows) == {d["id"] for d in snapshot}
    for d in snapshot:
        presence, state, variant, version = rows[d["id"]][1:5]
        assert (presence, variant, version) == (d["presence"], d["variant_id"], f"v{d['variant_version']}")
        assert state == d["state"] + (d["reason"] or "")  # the state badge, then the reason as text
        assert rows[d["id"]][9].split()[0] == (d["running"] or "\u2014")  # the variant (rung) it runs now
    users = {v.id: sum(d["variant_id"] == v.id for d in snapshot) for v in catalog.variants}
    assert {row[0]: int(row[-1]) for row in tables(page)["variants"]} == users
    assert f"{len(snapshot)} devices" in page and 'href="metrics"' in page and 'href="api/devices"' in page


def assert_hostile_text_is_inert(page: str) -> None:
    """The hostile reason is text: no markup of it survives, it ran nothing, and it reads back verbatim."""
    assert "<script>document.title" not in page and "<img src=x" not in page
    assert "<title>ReStNet Fleet status</title>" in page
    assert by_device(page)["dev-evil"][2] == "failed" + HOSTILE


# ---- the tests ------------------------------------------------------------------------------------------------

@needs_chromium
def test_status_command_and_page_show_every_enrolled_device(tmp_path, fleet, synthetic_catalog, raw_clients,
                                                            capsys):
    cfg, coordinator, _ = fleet
    enroll_hostile_device(cfg, coordinator, raw_clients)
    assert wait_until(lambda: sum(d["presence"] == "online" for d in coordinator.devices()) == 3)
    url = coordinator.public_url
    snapshot = coordinator.devices()

    # restnet status: one line per device with its presence, state, variant and version, then a summary.
    capsys.readouterr()
    assert restnet(["status", "--coordinator", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["device", "presence", "state", "variant", "version"]
    for d in snapshot:
        line = next(x for x in lines if x.startswith(d["id"] + " "))
        assert line.split()[1:5] == [d["presence"], d["state"], d["variant_id"], f"v{d['variant_version']}"]
    assert lines[-1].startswith("4 devices · 3 online · 0 stale · 1 offline · 3 installed · 3 of 3 variants")
    # ...the same through the config file, and as JSON
    config = write_config(tmp_path / "fleet.yaml", replace(cfg, http_public_url=url))
    assert restnet(["status", "--config", str(config)]) == 0
    again = capsys.readouterr().out.splitlines()
    assert [x.split()[:5] for x in again[2:6]] == [x.split()[:5] for x in lines[2:6]]
    assert restnet(["status", "--coordinator", url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(d["id"], d["state"], d["variant_id"]) for d in listed] == \
        [(d["id"], d["state"], d["variant_id"]) for d in snapshot]

    # As served, the page is the same constant shell for any fleet: the browser renders it from the JSON API.
    status, served, headers = http(url + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store" and "script-src 'sha256-" in headers["Content-Security-Policy"]
    assert http(url + "/index.html")[1] == served
    assert tables(served.decode()) == {"devices": [], "variants": []} and b"dev-evil" not in served
    assert b"<noscript>" in served and b"restnet status" in served

    # In chromium the page's script renders the fleet from the JSON API, hostile text inert.
    live = dump_dom(url + "/", tmp_path / "chromium")
    assert 'data-live="1"' in live and "live · updated" in live
    assert_shows_fleet(live, coordinator, synthetic_catalog)
    assert_hostile_text_is_inert(live)
    front, behind = synthetic_catalog.front.name, synthetic_catalog.behind.name
    assert f"catalog: {front} → {behind}" in live


@needs_chromium
def test_the_open_page_follows_the_fleet_without_a_reload(tmp_path, fleet, synthetic_catalog, device_agents):
    cfg, coordinator, agents = fleet
    browser = DevTools(tmp_path / "chromium")
    try:
        browser.open(coordinator.public_url + "/")
        rows = "Array.from(document.querySelectorAll('#devices tr'), tr => Array.from(tr.cells, td => td.textContent))"
        assert wait_until(lambda: browser.evaluate("document.body && document.body.dataset.live") == "1", 60)
        browser.evaluate("window.sameDocument = true")

        def first_paint() -> bool:  # the script marks the page live before its first fetch answers
            shown = {r[0]: r for r in browser.evaluate(rows)}
            return set(shown) == {d.id for d in DEVICES} and all(r[1] == "online" for r in shown.values())

        assert wait_until(first_paint, 30, every=0.2)

        agents[0].stop()  # dev-small leaves (offline) ...
        newcomer = replace(DEVICES[2], id="dev-new")
        assert not wait_settled([device_agents(cfg, newcomer)], 60)  # ... and a device enrolls after first paint

        def fleet_now() -> dict:
            return {d["id"]: (d["presence"], d["state"], d["variant_id"]) for d in coordinator.devices()}

        assert wait_until(lambda: fleet_now()["dev-small"][0] == "offline"
                          and fleet_now()["dev-new"] == ("online", "installed", "syn.4_4"))
        want = fleet_now()

        def page_caught_up() -> bool:
            return {r[0]: (r[1], r[2], r[3]) for r in browser.evaluate(rows)} == want

        assert wait_until(page_caught_up, 60, every=0.5)
        assert browser.evaluate("window.sameDocument") is True  # refreshed in place, not reloaded
        summary = browser.evaluate("document.getElementById('summary').textContent")
        assert summary.startswith("4 devices · 3 online · 0 stale · 1 offline · 4 installed")
    finally:
        browser.close()


def test_status_command_names_an_unreachable_coordinator(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert restnet(["status", "--coordinator", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach the coordinator at {url}/api/devices") and err.count("\n") == 1

