"""The embedded registry: one SQLite file in WAL mode, one writer (the coordinator's worker), any number of readers.

Writes happen inside `transaction()` (`BEGIN IMMEDIATE`): the worker stages a whole batch of messages and commits
once (group commit), then publishes. `synchronous=FULL` makes a commit survive power loss, so "durable before
published" holds for any crash, not only a killed process. One coordinator only: the file is on its disk.
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from server.registry_base import LATER_STEPS, Registry

# Schema versions (docs/ARCHITECTURE.md, "Registry"): step n takes version n-1 to n. Never edit a released step.
STEPS = [
    [  # 1: devices, the request ids they sent, presence (files written before versioning are at version 1)
        """CREATE TABLE IF NOT EXISTS devices (
            id TEXT PRIMARY KEY,
            profile TEXT NOT NULL,            -- JSON [memory_mb, compute, latency_ms, agent_version]
            request_id TEXT NOT NULL,         -- the enrollment the current desired state answers
            version INTEGER NOT NULL,         -- desired-state version, only increases
            assignment_id TEXT NOT NULL,
            variant_id TEXT,                  -- NULL when refused
            variant_version INTEGER,
            desired TEXT NOT NULL,            -- the exact payload published (retained) on the desired topic
            state TEXT NOT NULL,              -- assigned | refused | downloading | verified | installed | failed
            reason TEXT,
            enrolled_at REAL NOT NULL,
            updated_at REAL NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS devices_variant ON devices(variant_id)",
        """CREATE TABLE IF NOT EXISTS requests (device_id TEXT NOT NULL, request_id TEXT NOT NULL,
            PRIMARY KEY (device_id, request_id)) WITHOUT ROWID""",
        """CREATE TABLE IF NOT EXISTS presence (
            device_id TEXT PRIMARY KEY,
            presence TEXT NOT NULL,           -- online | offline | stale
            seq INTEGER NOT NULL,
            last_seen REAL NOT NULL)""",
    ],
] + LATER_STEPS


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


class SqliteRegistry(Registry):
    def __init__(self, path: Path | str, url: str | None = None):
        self.path = str(path)
        self.url = url or self.path
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect(self.path)
        self._local = threading.local()
        self._migrate(STEPS)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def lock_devices(self, device_ids: list[str]) -> None:
        """Nothing to do: `BEGIN IMMEDIATE` already keeps every other writer out."""

    def _lock_schema(self) -> None:
        """Nothing to do: `BEGIN IMMEDIATE` already keeps every other writer out."""

    def _write(self, sql: str, params: tuple = ()):
        return self._db.execute(sql, params)

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
        return conn.execute(sql, params).fetchall()
