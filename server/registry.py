"""The device registry: SQLite in WAL mode, one writer (the coordinator's worker), any number of readers.

Writes happen inside `transaction()`: the worker stages a whole batch of messages and commits once (group
commit), then publishes. `synchronous=FULL` makes a commit survive power loss, so "durable before published"
holds for any crash, not only a killed process.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.messages import Profile

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    profile TEXT NOT NULL,            -- JSON of the last enrolled Profile
    request_id TEXT NOT NULL,         -- the enrollment the current desired state answers
    version INTEGER NOT NULL,         -- desired-state version, only increases
    assignment_id TEXT NOT NULL,
    variant_id TEXT,                  -- NULL when refused
    variant_version INTEGER,
    desired TEXT NOT NULL,            -- the exact payload published (retained) on the desired topic
    state TEXT NOT NULL,              -- assigned | refused | downloading | verified | installed | failed
    reason TEXT,
    enrolled_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_variant ON devices(variant_id);
CREATE TABLE IF NOT EXISTS requests (
    device_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (device_id, request_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS presence (
    device_id TEXT PRIMARY KEY,
    presence TEXT NOT NULL,           -- online | offline | stale
    seq INTEGER NOT NULL,
    last_seen REAL NOT NULL
);
"""
LIFECYCLE = ("assigned", "refused", "downloading", "verified", "installed", "failed")
PRESENCE = ("online", "offline", "stale")


@dataclass
class DeviceRow:
    id: str
    profile: Profile
    request_id: str
    version: int
    assignment_id: str
    variant_id: str | None
    variant_version: int | None
    desired: bytes
    state: str
    reason: str | None
    enrolled_at: float
    updated_at: float


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


class Registry:
    def __init__(self, path: Path | str):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect(self.path)
        self._db.executescript(SCHEMA)
        self._local = threading.local()

    def close(self) -> None:
        self._db.close()

    # ---- writer side (the coordinator's worker thread only) ---------------------------------------------

    @contextmanager
    def transaction(self):
        """One commit for everything done inside; rolled back on error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def get(self, device_id: str) -> DeviceRow | None:
        row = self._db.execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
        return _row(row) if row else None

    def seen_request(self, device_id: str, request_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM requests WHERE device_id = ? AND request_id = ?",
                                (device_id, request_id)).fetchone() is not None

    def put(self, dev: DeviceRow) -> None:
        """Insert or replace a device's row and remember its request id (for idempotent enrollment)."""
        p = dev.profile
        self._db.execute(
            "INSERT OR REPLACE INTO devices VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (dev.id, json.dumps([p.memory_mb, p.compute, p.latency_ms, p.agent_version]), dev.request_id,
             dev.version, dev.assignment_id, dev.variant_id, dev.variant_version, dev.desired.decode(),
             dev.state, dev.reason, dev.enrolled_at, dev.updated_at))
        self._db.execute("INSERT OR IGNORE INTO requests VALUES (?, ?)", (dev.id, dev.request_id))

    def set_state(self, device_id: str, assignment_id: str, state: str, reason: str | None, now: float) -> bool:
        """Record a device's report on its current assignment; reports on older assignments change nothing."""
        cur = self._db.execute("UPDATE devices SET state = ?, reason = ?, updated_at = ? "
                               "WHERE id = ? AND assignment_id = ?", (state, reason, now, device_id, assignment_id))
        return cur.rowcount == 1

    def set_presence(self, device_id: str, presence: str, seq: int, now: float) -> bool:
        """Apply a presence report unless an older connection generation's (lower seq) arrives late."""
        cur = self._db.execute(
            "INSERT INTO presence VALUES (?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET "
            "presence = excluded.presence, seq = excluded.seq, last_seen = excluded.last_seen "
            "WHERE excluded.seq >= presence.seq", (device_id, presence, seq, now))
        return cur.rowcount == 1

    def touch(self, device_id: str, now: float) -> None:
        """A heartbeat: the device is alive now (a stale device becomes online again)."""
        self._db.execute("INSERT INTO presence VALUES (?, 'online', 0, ?) ON CONFLICT(device_id) DO UPDATE SET "
                         "presence = 'online', last_seen = excluded.last_seen", (device_id, now))

    def mark_stale(self, cutoff: float) -> int:
        """Online devices not heard from since `cutoff` become stale."""
        return self._db.execute("UPDATE presence SET presence = 'stale' WHERE presence = 'online' "
                                "AND last_seen < ?", (cutoff,)).rowcount

    def on_variant(self, variant_id: str) -> list[DeviceRow]:
        return [_row(r) for r in self._db.execute("SELECT * FROM devices WHERE variant_id = ?", (variant_id,))]

    def all_desired(self) -> list[tuple[str, bytes]]:
        return [(i, d.encode()) for i, d in self._db.execute("SELECT id, desired FROM devices")]

    # ---- reader side (any thread: HTTP handlers, metrics, tests) ----------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
        return conn

    def count_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(LIFECYCLE, 0)
        counts.update(self._reader().execute("SELECT state, COUNT(*) FROM devices GROUP BY state"))
        return counts

    def count_by_presence(self) -> dict[str, int]:
        counts = dict.fromkeys(PRESENCE, 0)
        counts.update(self._reader().execute("SELECT presence, COUNT(*) FROM presence GROUP BY presence"))
        return counts

    def device(self, device_id: str) -> DeviceRow | None:
        row = self._reader().execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
        return _row(row) if row else None

    def snapshot(self) -> list[dict]:
        """Every device with its presence, as plain data (the /api/devices listing)."""
        rows = self._reader().execute(
            "SELECT d.*, p.presence, p.last_seen FROM devices d LEFT JOIN presence p ON p.device_id = d.id "
            "ORDER BY d.id").fetchall()
        out = []
        for r in rows:
            dev = _row(r[:12])
            out.append({"id": dev.id, "state": dev.state, "reason": dev.reason, "online": r[12] == "online",
                        "presence": r[12] or "offline", "variant_id": dev.variant_id,
                        "variant_version": dev.variant_version, "version": dev.version,
                        "assignment_id": dev.assignment_id, "profile": vars(dev.profile), "last_seen": r[13]})
        return out


def _row(r) -> DeviceRow:
    memory_mb, compute, latency_ms, agent_version = json.loads(r[1])
    return DeviceRow(r[0], Profile(memory_mb, compute, latency_ms, agent_version=agent_version), r[2], r[3], r[4], r[5], r[6],
                     r[7].encode(), r[8], r[9], r[10], r[11])
