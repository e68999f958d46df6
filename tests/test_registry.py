"""The SQLite registry: WAL, group commits, idempotency bookkeeping, report and presence ordering."""
from __future__ import annotations

import sqlite3

import pytest
from fleet_helpers import request_count

from server.registry import DeviceRow, Registry
from shared.messages import Profile


def row(device_id: str = "d1", request_id: str = "r1", version: int = 1, assignment_id: str = "a1",
        variant_id: str | None = "v1") -> DeviceRow:
    return DeviceRow(device_id, Profile(64.0, 1.0, None, agent_version="t"), request_id, version, assignment_id, variant_id,
                     1 if variant_id else None, b'{"v":1}', "assigned" if variant_id else "refused", None, 1.0, 1.0)


@pytest.fixture
def registry(tmp_path):
    r = Registry(tmp_path / "fleet.db")
    yield r
    r.close()


def test_wal_and_full_sync(registry):
    conn = sqlite3.connect(registry.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert registry._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_put_get_and_request_ids(registry, tmp_path):
    with registry.transaction():
        registry.put(row())
        registry.put(row(request_id="r2", version=2, assignment_id="a2"))
    dev = registry.get("d1")
    assert (dev.request_id, dev.version, dev.profile) == ("r2", 2, Profile(64.0, 1.0, None, agent_version="t"))
    assert registry.seen_request("d1", "r1") and registry.seen_request("d1", "r2")
    assert not registry.seen_request("d1", "r3")
    assert request_count(registry.path, "d1") == 2
    registry.close()
    again = Registry(tmp_path / "fleet.db")  # committed means durable
    assert again.device("d1").assignment_id == "a2"
    again.close()


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
