"""The registry on both engines (a real SQLite file, a real PostgreSQL): group commits, idempotency bookkeeping
and its bound, report and presence ordering, schema versions, one-line errors; and PostgreSQL's several writers."""
from __future__ import annotations

import sqlite3
import threading

import pytest
from fleet_helpers import registry_url, request_count  # noqa: F401

from server.registry import REQUESTS_KEPT, DeviceRow, open_registry
from server.registry_base import remember
from shared.errors import ConfigError
from shared.messages import Profile


def row(device_id: str = "d1", request_id: str = "r1", version: int = 1, assignment_id: str = "a1",
        variant_id: str | None = "v1", requests: tuple[str, ...] | None = None) -> DeviceRow:
    return DeviceRow(device_id, Profile(64.0, 1.0, None, agent_version="t"), request_id, version, assignment_id,
                     variant_id, 1 if variant_id else None, b'{"v":1}', "assigned" if variant_id else "refused", None,
                     1.0, 1.0, (request_id,) if requests is None else requests)


@pytest.fixture
def registry(registry_url):
    r = open_registry(registry_url)
    yield r
    r.close()


def test_sqlite_wal_and_full_sync(tmp_path):
    registry = open_registry(f"sqlite:///{tmp_path}/fleet.db")
    conn = sqlite3.connect(registry.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert registry._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    registry.close()


def test_put_get_and_request_ids(registry, registry_url):
    with registry.transaction():
        registry.put(row())
        registry.put(row(request_id="r2", version=2, assignment_id="a2", requests=("r1", "r2")))
    dev = registry.device("d1")
    assert (dev.request_id, dev.version, dev.profile) == ("r2", 2, Profile(64.0, 1.0, None, agent_version="t"))
    assert dev.answered("r1") and dev.answered("r2") and not dev.answered("r3")
    assert request_count(registry, "d1") == 2
    registry.close()
    again = open_registry(registry_url)  # committed means durable
    assert again.device("d1").assignment_id == "a2"
    again.close()


def test_a_device_keeps_only_its_latest_request_ids(registry):
    """1,000 distinct request ids from one device leave at most REQUESTS_KEPT, the newest."""
    requests: tuple[str, ...] = ()
    for n in range(1000):
        requests = remember(requests, f"req-{n}")
        with registry.transaction():
            registry.put(row(request_id=f"req-{n}", requests=requests))
    dev = registry.device("d1")
    assert dev.requests == tuple(f"req-{n}" for n in range(1000 - REQUESTS_KEPT, 1000))
    assert request_count(registry, "d1") == REQUESTS_KEPT
    assert remember(dev.requests, "req-999") == dev.requests  # a repeat is not a new request


def test_a_failed_batch_leaves_nothing(registry):
    with pytest.raises(RuntimeError):
        with registry.transaction():
            registry.put(row())
            raise RuntimeError("boom")
    assert registry.device("d1") is None


def test_readers_see_only_committed_batches(registry):
    with registry.transaction():
        registry.put(row())
        assert registry.device("d1") is None  # another connection: the batch is not committed yet
    assert registry.device("d1") is not None


def test_reports_apply_to_the_current_assignment_only(registry):
    with registry.transaction():
        registry.put(row(assignment_id="a2"))
        assert not registry.set_state("d1", "a1", "installed", None, 2.0)
        assert registry.set_state("d1", "a2", "failed", "hash mismatch", 2.0)
    dev = registry.device("d1")
    assert (dev.state, dev.reason) == ("failed", "hash mismatch")
    assert registry.count_by_state()["failed"] == 1


def test_presence_ignores_older_connections_and_goes_stale(registry):
    with registry.transaction():
        registry.set_presence("d1", "online", 5, 10.0)
        assert not registry.set_presence("d1", "offline", 4, 11.0)  # the last will of an older connection
        registry.set_presence("d2", "online", 1, 10.0)
        registry.touch("d2", 20.0)
        assert registry.mark_stale(15.0) == 1
    assert registry.count_by_presence() == {"online": 1, "offline": 0, "stale": 1}
    with registry.transaction():
        registry.touch("d1", 30.0)  # a heartbeat revives a stale device
    assert registry.count_by_presence()["stale"] == 0


def test_snapshot_and_variant_lookup(registry):
    with registry.transaction():
        registry.put(row("d1"))
        registry.put(row("d2", variant_id=None))
        registry.set_presence("d1", "online", 1, 5.0)
    snap = {d["id"]: d for d in registry.snapshot()}
    assert snap["d1"]["online"] and snap["d1"]["variant_id"] == "v1" and snap["d1"]["last_seen"] == 5.0
    assert not snap["d2"]["online"] and snap["d2"]["state"] == "refused" and snap["d2"]["presence"] == "offline"
    with registry.transaction():
        assert [d.id for d in registry.on_variant("v1")] == ["d1"]
        assert sorted(i for i, _ in registry.all_desired()) == ["d1", "d2"]
        assert registry.desired_of(["d2", "d3"]) == {"d2": b'{"v":1}'}


def test_a_registry_of_the_first_schema_is_migrated(tmp_path):
    """A fleet.db written before schema versions (its `requests` table unbounded) opens at the current version;
    each device keeps the request id its desired state answers."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        from server.registry_sqlite import STEPS

        for statement in STEPS[0]:
            db.execute(statement)
        db.execute("INSERT INTO devices VALUES ('d1', '[64.0, 1.0, null, \"t\"]', 'r9', 3, 'a3', 'v1', 1, '{}', "
                   "'installed', NULL, 1.0, 2.0)")
        db.executemany("INSERT INTO requests VALUES ('d1', ?)", [(f"r{n}",) for n in range(10)])
    registry = open_registry(str(path))
    dev = registry.device("d1")
    assert (dev.version, dev.state, dev.requests) == (3, "installed", ("r9",))
    assert (dev.rungs, dev.running) == ((), None)  # version 3: no ladder until the device enrolls with a budget
    registry.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM registry_schema").fetchall() == [(3,)]
        assert not db.execute("SELECT name FROM sqlite_master WHERE name = 'requests'").fetchall()


def test_a_newer_schema_is_refused(registry_url):
    registry = open_registry(registry_url)
    with registry.transaction():
        registry._write("UPDATE registry_schema SET version = 99")
    registry.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        open_registry(registry_url)


def test_bad_registry_settings_are_one_line_errors(tmp_path, postgres_server):
    for url, text in [("mysql://h/db", "unknown kind of registry"), ("sqlite://fleet.db", "not a SQLite URL"),
                      (postgres_server.url("fleet_missing"), "does not exist"),
                      ("postgresql://restnet@127.0.0.1:1/fleet", "cannot reach the registry database at 127.0.0.1:1")]:
        with pytest.raises(ConfigError, match=text) as err:
            open_registry(url)
        assert "\n" not in str(err.value)
    url = postgres_server.create_database()
    wrong = url.replace(":registry-secret@", ":wrong-secret@")
    with pytest.raises(ConfigError, match="refused the login for restnet") as err:
        open_registry(wrong)
    assert "wrong-secret" not in str(err.value) and "***" in str(err.value)
    sqlite_url = open_registry(f"sqlite:///{tmp_path}/relative.db")
    assert sqlite_url.path == f"{tmp_path}/relative.db"
    sqlite_url.close()


def test_postgres_writers_of_one_device_take_turns(postgres_server):
    """Two registries (two coordinators) on one database: the second writer of a device waits for the first's
    commit and builds on its version; devices locked in one pass, ascending, so opposite orders cannot deadlock."""
    url = postgres_server.create_database()
    a, b = open_registry(url), open_registry(url)
    try:
        entered, release = threading.Event(), threading.Event()

        def first():
            with a.transaction():
                a.lock_devices(["d1", "d2"])
                a.put(row("d1", version=1))
                entered.set()
                release.wait(10)

        t = threading.Thread(target=first)
        t.start()
        assert entered.wait(10)
        seen = []

        def second():
            with b.transaction():
                b.lock_devices(["d2", "d1"])  # the opposite order: no deadlock
                prev = b.get("d1")
                seen.append(prev.version)
                b.put(row("d1", version=prev.version + 1, assignment_id="a2"))

        u = threading.Thread(target=second)
        u.start()
        u.join(0.5)
        assert u.is_alive() and not seen, "the second writer must wait for the first's commit"
        release.set()
        t.join(10)
        u.join(10)
        assert seen == [1] and a.device("d1").version == 2
    finally:
        a.close()
        b.close()
