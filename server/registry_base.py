"""What every registry backend stores and promises, written once: the rows, the SQL, the schema versions.

A backend (`server.registry_sqlite`, `server.registry_postgres`) supplies a connection and what differs between the
engines: how a transaction begins, how devices are locked against other writers, its schema steps. The SQL below is
written with `?` placeholders and is the same for both engines (`INSERT ... ON CONFLICT` is SQLite >= 3.24 and
PostgreSQL); a backend may translate the placeholder (`_sql`).

Ladders: a device with a storage budget holds several rungs; its row keeps them (`rungs`, "variant@version" tokens,
top first, space separated; empty for a device on one variant) so a new version of any rung finds the devices that
hold it, and `running`, the rung the device last said it runs (NULL until it says so).

Request ids: a device row keeps the last `REQUESTS_KEPT` request ids the device sent (oldest first, space separated:
request ids are tokens without spaces), so enrollment stays idempotent on (device id, request id) for recent
requests while one device cannot grow the registry without bound.
"""
from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from shared.errors import ConfigError
from shared.messages import Profile

REQUESTS_KEPT = 16  # request ids remembered per device; an older one comes back as a new request
LIFECYCLE = ("assigned", "refused", "downloading", "verified", "installed", "failed")
PRESENCE = ("online", "offline", "stale")
COLUMNS = ("id, profile, request_id, version, assignment_id, variant_id, variant_version, desired, state, reason, "
           "enrolled_at, updated_at, requests, rungs, running")


PUT = (f"INSERT INTO devices ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET "
       "profile = excluded.profile, request_id = excluded.request_id, version = excluded.version, "
       "assignment_id = excluded.assignment_id, variant_id = excluded.variant_id, "
       "variant_version = excluded.variant_version, desired = excluded.desired, state = excluded.state, "
       "reason = excluded.reason, enrolled_at = excluded.enrolled_at, updated_at = excluded.updated_at, "
       "requests = excluded.requests, rungs = excluded.rungs, running = excluded.running")


# Schema steps after the first, the same SQL on every engine (each engine's own module holds step 1, its dialect).
LATER_STEPS = [
    [  # 2: at most REQUESTS_KEPT request ids per device, in its row; a device keeps its current one
        "ALTER TABLE devices ADD COLUMN requests TEXT NOT NULL DEFAULT ''",
        "UPDATE devices SET requests = request_id",
        "DROP TABLE requests",
    ],
    [  # 3: a ladder's rungs ("variant@version", top first) and the rung the device runs
        "ALTER TABLE devices ADD COLUMN rungs TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE devices ADD COLUMN running TEXT",
    ],
]


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
    requests: tuple[str, ...] = ()  # the last REQUESTS_KEPT request ids, oldest first
    rungs: tuple[str, ...] = ()  # a ladder's rungs as "variant@version", top first; () for one variant
    running: str | None = None  # the rung the device reported running (a ladder's SWITCHED status)

    def holds(self, variant_id: str) -> int | None:
        """The version of `variant_id` this device holds (as its variant or a rung of its ladder), if any."""
        if self.variant_id == variant_id:
            return self.variant_version
        for token in self.rungs:
            held, _, version = token.rpartition("@")
            if held == variant_id:
                return int(version)
        return None

    def answered(self, request_id: str) -> bool:
        """Is `request_id` one of the device's recent requests (so a repeat gets the current desired state)?"""
        return request_id in self.requests


def remember(requests: tuple[str, ...], request_id: str) -> tuple[str, ...]:
    """The recent request ids after `request_id`: appended, the oldest dropped past REQUESTS_KEPT."""
    if request_id in requests:
        return requests
    return (*requests, request_id)[-REQUESTS_KEPT:]


class Registry:
    """The device registry. Writer methods run on the coordinator's worker inside `transaction()`; reader methods
    (counts, `device`, `snapshot`) may run on any thread and see committed data only."""

    url: str  # what fleet.registry said (for messages; no password)

    # ---- what a backend supplies -------------------------------------------------------------------------

    def transaction(self) -> AbstractContextManager:
        """One commit for everything done inside; rolled back on error."""
        raise NotImplementedError

    def lock_devices(self, device_ids: list[str]) -> None:
        """Inside a transaction: hold these devices against other writers until it ends (called once, first)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _write(self, sql: str, params: tuple = ()) -> Any:
        """A cursor for a statement on the writer's connection (inside `transaction()`)."""
        raise NotImplementedError

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        """All rows of a query on a reader connection (committed data, any thread)."""
        raise NotImplementedError

    # ---- writer side ---------------------------------------------------------------------------------------

    def get(self, device_id: str) -> DeviceRow | None:
        row = self._write(f"SELECT {COLUMNS} FROM devices WHERE id = ?", (device_id,)).fetchone()
        return decode_row(row) if row else None

    def put(self, dev: DeviceRow) -> None:
        """Insert or replace a device's row (with its recent request ids)."""
        self._write(PUT, put_params(dev))

    def set_state(self, device_id: str, assignment_id: str, state: str, reason: str | None, now: float) -> bool:
        """Record a device's report on its current assignment; reports on older assignments change nothing."""
        cur = self._write("UPDATE devices SET state = ?, reason = ?, updated_at = ? WHERE id = ? AND assignment_id = ?",
                          (state, reason, now, device_id, assignment_id))
        return cur.rowcount == 1

    def set_running(self, device_id: str, assignment_id: str, variant_id: str) -> bool:
        """Record the rung a device says it switched to, for its current assignment and only a rung it holds."""
        dev = self.get(device_id)
        if dev is None or dev.assignment_id != assignment_id or variant_id not in (t.rpartition("@")[0]
                                                                                    for t in dev.rungs):
            return False
        self._write("UPDATE devices SET running = ? WHERE id = ?", (variant_id, device_id))
        dev.running = variant_id  # a backend that keeps rows read under its locks sees its own write
        return True

    def set_presence(self, device_id: str, presence: str, seq: int, now: float) -> bool:
        """Apply a presence report unless an older connection generation's (lower seq) arrives late."""
        cur = self._write(
            "INSERT INTO presence (device_id, presence, seq, last_seen) VALUES (?,?,?,?) ON CONFLICT (device_id) "
            "DO UPDATE SET presence = excluded.presence, seq = excluded.seq, last_seen = excluded.last_seen "
            "WHERE excluded.seq >= presence.seq", (device_id, presence, seq, now))
        return cur.rowcount == 1

    def touch(self, device_id: str, now: float) -> None:
        """A heartbeat: the device is alive now (a stale device becomes online again)."""
        self._write("INSERT INTO presence (device_id, presence, seq, last_seen) VALUES (?, 'online', 0, ?) "
                    "ON CONFLICT (device_id) DO UPDATE SET presence = 'online', last_seen = excluded.last_seen",
                    (device_id, now))

    def mark_stale(self, cutoff: float) -> int:
        """Online devices not heard from since `cutoff` become stale."""
        return self._write("UPDATE presence SET presence = 'stale' WHERE presence = 'online' AND last_seen < ?",
                           (cutoff,)).rowcount

    def on_variant(self, variant_id: str) -> list[DeviceRow]:
        """Devices that hold `variant_id`: as their variant or as a rung of their ladder."""
        rows = self._write(f"SELECT {COLUMNS} FROM devices WHERE variant_id = ? OR rungs LIKE ? ORDER BY id",
                           (variant_id, f"%{variant_id}@%")).fetchall()
        return [dev for dev in map(decode_row, rows) if dev.holds(variant_id) is not None]  # LIKE's _ matches any

    def all_desired(self) -> list[tuple[str, bytes]]:
        return [(i, d.encode()) for i, d in self._write("SELECT id, desired FROM devices").fetchall()]

    def desired_of(self, device_ids: list[str]) -> dict[str, bytes]:
        """The committed desired state of each of these devices (that has a row)."""
        out = {}
        for start in range(0, len(device_ids), 500):
            chunk = device_ids[start:start + 500]
            rows = self._write(f"SELECT id, desired FROM devices WHERE id IN ({','.join('?' * len(chunk))})",
                               tuple(chunk))
            out.update((i, d.encode()) for i, d in rows.fetchall())
        return out

    # ---- reader side ---------------------------------------------------------------------------------------

    def count_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(LIFECYCLE, 0)
        counts.update(self._read("SELECT state, COUNT(*) FROM devices GROUP BY state"))
        return counts

    def count_by_presence(self) -> dict[str, int]:
        counts = dict.fromkeys(PRESENCE, 0)
        counts.update(self._read("SELECT presence, COUNT(*) FROM presence GROUP BY presence"))
        return counts

    def count_by_running(self) -> dict[str, int]:
        """Devices per variant they run now: the rung they reported, else their assigned variant."""
        return dict(self._read("SELECT COALESCE(running, variant_id), COUNT(*) FROM devices "
                               "WHERE variant_id IS NOT NULL GROUP BY COALESCE(running, variant_id)"))

    def device(self, device_id: str) -> DeviceRow | None:
        rows = self._read(f"SELECT {COLUMNS} FROM devices WHERE id = ?", (device_id,))
        return decode_row(rows[0]) if rows else None

    def snapshot(self) -> list[dict]:
        """Every device with its presence, as plain data (the /api/devices listing)."""
        columns = ", ".join(f"d.{c}" for c in COLUMNS.split(", "))
        rows = self._read(f"SELECT {columns}, p.presence, p.last_seen FROM devices d "
                          "LEFT JOIN presence p ON p.device_id = d.id ORDER BY d.id")
        out = []
        for r in rows:
            dev = decode_row(r[:15])
            out.append({"id": dev.id, "state": dev.state, "reason": dev.reason, "online": r[15] == "online",
                        "presence": r[15] or "offline", "variant_id": dev.variant_id,
                        "variant_version": dev.variant_version, "version": dev.version,
                        "assignment_id": dev.assignment_id, "profile": vars(dev.profile), "last_seen": r[16],
                        "rungs": [t.rpartition("@")[0] for t in dev.rungs],
                        "running": dev.running or (dev.variant_id if not dev.rungs else None)})
        return out

    # ---- schema --------------------------------------------------------------------------------------------

    def _migrate(self, steps: list[list[str]]) -> None:
        """Bring the schema to version len(steps): step n (1-based) takes version n-1 to n. Runs in one
        transaction, after `_lock_schema` (several coordinators may start at once)."""
        with self.transaction():
            self._lock_schema()
            self._write("CREATE TABLE IF NOT EXISTS registry_schema (version INTEGER NOT NULL)")
            row = self._write("SELECT MAX(version) FROM registry_schema").fetchone()
            version = row[0] or 0
            if version > len(steps):
                raise ConfigError(f"the registry {self.url} has schema version {version}; this coordinator knows "
                                  f"versions up to {len(steps)}", "upgrade restnet-fleet on this coordinator")
            for statement in (s for step in steps[version:] for s in step):
                self._write(statement)
            if version < len(steps):
                self._write("DELETE FROM registry_schema")
                self._write("INSERT INTO registry_schema (version) VALUES (?)", (len(steps),))

    def _lock_schema(self) -> None:
        """Inside the migration's transaction: keep other coordinators out of the schema until it commits."""
        raise NotImplementedError


def put_params(dev: DeviceRow) -> tuple:
    p = dev.profile
    profile = [p.memory_mb, p.compute, p.latency_ms, p.agent_version] + \
        ([p.storage_mb] if p.storage_mb is not None else [])  # rows of devices without a budget stay as before
    return (dev.id, json.dumps(profile), dev.request_id, dev.version, dev.assignment_id, dev.variant_id,
            dev.variant_version, dev.desired.decode(), dev.state, dev.reason, dev.enrolled_at, dev.updated_at,
            " ".join(dev.requests), " ".join(dev.rungs), dev.running)


def decode_row(r) -> DeviceRow:
    memory_mb, compute, latency_ms, agent_version, *storage = json.loads(r[1])
    profile = Profile(memory_mb, compute, latency_ms, agent_version=agent_version,
                      storage_mb=storage[0] if storage else None)
    return DeviceRow(r[0], profile, r[2], r[3], r[4], r[5], r[6], r[7].encode(), r[8], r[9], r[10], r[11],
                     tuple(r[12].split()), tuple(r[13].split()), r[14])
