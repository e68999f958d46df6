"""The registry on PostgreSQL (psycopg 3): several coordinators share it, with the SQLite registry's guarantees.

- Durable before published: the worker's batch is one transaction, committed before anything is published
  (PostgreSQL's default `synchronous_commit=on` flushes the WAL at commit).
- Idempotent on (device id, request id) and versions that only increase, with several writers: a transaction
  first takes a transaction-scoped advisory lock per device it will write (`lock_devices`), all of them in one
  statement, in ascending key order. Two coordinators handling the same device therefore take turns: the second
  reads the first one's committed row (READ COMMITTED reads the latest commit) and builds on its version; and
  because every transaction takes its locks in one ascending pass, two of them can never wait for each other in a
  circle (no deadlock). A device's first enrollment is covered too (there is no row yet to lock with FOR UPDATE).
- Round trips: `lock_devices` also reads the locked devices' rows in the same go, `get` answers from them, and
  `put` is held until the next statement or the commit, then sent as one pipelined `executemany`: a batch of
  enrollments costs a few round trips, not two per device.
- Sweeps: marking silent devices stale skips rows another transaction holds (`SKIP LOCKED`): such a device is being
  written right now, so it is not silent, and the sweep never waits on a batch.
- A coordinator that vanishes without closing its connection holds its devices for at most
  `IDLE_IN_TRANSACTION_S` (the server ends such a session); a killed process's locks go with its connection.

Credentials: in the URL, or libpq's own environment (`PGPASSWORD`, `PGPASSFILE`, `PGSSLMODE`...), which psycopg
reads, so the fleet config need not hold the password.
"""
from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from urllib.parse import urlsplit

import psycopg

from server.registry_base import COLUMNS, LATER_STEPS, PUT, DeviceRow, Registry, decode_row, put_params
from shared.errors import ConfigError

IDLE_IN_TRANSACTION_S = 30
CONNECT_TIMEOUT_S = 10
SCHEMA_LOCK = (0x52455354, 1)  # two-int advisory key ("REST", 1): a key space apart from the devices' bigint keys

# Schema versions (docs/ARCHITECTURE.md, "Registry"): the same versions as the SQLite registry's, in PostgreSQL's
# types. Step n takes version n-1 to n. Never edit a released step.
STEPS = [
    [  # 1: devices, the request ids they sent, presence
        """CREATE TABLE IF NOT EXISTS devices (
            id TEXT PRIMARY KEY,
            profile TEXT NOT NULL,
            request_id TEXT NOT NULL,
            version BIGINT NOT NULL,
            assignment_id TEXT NOT NULL,
            variant_id TEXT,
            variant_version BIGINT,
            desired TEXT NOT NULL,
            state TEXT NOT NULL,
            reason TEXT,
            enrolled_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS devices_variant ON devices(variant_id)",
        """CREATE TABLE IF NOT EXISTS requests (device_id TEXT NOT NULL, request_id TEXT NOT NULL,
            PRIMARY KEY (device_id, request_id))""",
        """CREATE TABLE IF NOT EXISTS presence (
            device_id TEXT PRIMARY KEY,
            presence TEXT NOT NULL,
            seq BIGINT NOT NULL,
            last_seen DOUBLE PRECISION NOT NULL)""",
    ],
] + LATER_STEPS


def device_key(device_id: str) -> int:
    """A device's advisory-lock key: 64 bits of its id's hash (two ids sharing a key only take turns more)."""
    return int.from_bytes(hashlib.blake2b(device_id.encode(), digest_size=8).digest(), "big", signed=True)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class PostgresRegistry(Registry):
    def __init__(self, url: str):
        self._dsn, self.url = url, redact(url)
        self._db = self._connect()
        self._reader = self._connect(autocommit=True)
        self._reader_lock = threading.Lock()
        self._locked: set[int] = set()
        self._rows: dict[str, DeviceRow | None] = {}  # devices read under this transaction's locks (None: no row)
        self._puts: dict[str, DeviceRow] = {}  # written, not yet sent
        self._migrate(STEPS)

    def _connect(self, autocommit: bool = False) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.OperationalError as exc:
            raise _connect_error(self.url, exc) from None
        except psycopg.ProgrammingError as exc:  # libpq could not parse the URL
            raise ConfigError(f"fleet.registry {self.url!r} is not a PostgreSQL URL libpq understands: "
                              f"{str(exc).splitlines()[0]}", "postgresql://USER@HOST:PORT/DATABASE") from None
        conn.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_S}s'")
        conn.autocommit = autocommit
        return conn

    def close(self) -> None:
        self._db.close()
        self._reader.close()

    @contextmanager
    def transaction(self):
        if self._db.broken:  # the server restarted or dropped us: the batch gets a new connection
            self._db = self._connect()
        self._locked, self._rows, self._puts = set(), {}, {}
        with self._db.transaction():
            yield
            self._flush()

    def lock_devices(self, device_ids: list[str]) -> None:
        keys = sorted({device_key(d) for d in device_ids} - self._locked)
        if not keys:
            return
        self._flush()
        self._db.execute("SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k", (keys,))
        self._locked.update(keys)
        ids = sorted({d for d in device_ids if d not in self._rows})
        self._rows.update(dict.fromkeys(ids))
        rows = self._db.execute(f"SELECT {COLUMNS} FROM devices WHERE id = ANY(%s)", (ids,)).fetchall()
        self._rows.update((r[0], decode_row(r)) for r in rows)

    def get(self, device_id: str) -> DeviceRow | None:
        if device_id in self._rows:  # read under our lock, or written by this transaction
            return self._rows[device_id]
        return super().get(device_id)

    def put(self, dev: DeviceRow) -> None:
        self._rows[dev.id] = self._puts[dev.id] = dev

    def _flush(self) -> None:
        """Send the held `put`s (before any other statement, so the transaction reads its own writes)."""
        if self._puts:
            puts, self._puts = list(self._puts.values()), {}
            with self._db.cursor() as cur:
                cur.executemany(_sql(PUT), [put_params(dev) for dev in puts])

    def _lock_schema(self) -> None:
        self._db.execute("SELECT pg_advisory_xact_lock(%s, %s)", SCHEMA_LOCK)

    def mark_stale(self, cutoff: float) -> int:
        self._flush()
        return self._db.execute(
            "UPDATE presence SET presence = 'stale' WHERE device_id IN (SELECT device_id FROM presence "
            "WHERE presence = 'online' AND last_seen < %s FOR UPDATE SKIP LOCKED)", (cutoff,)).rowcount

    def _write(self, sql: str, params: tuple = ()):
        self._flush()
        return self._db.execute(_sql(sql), params)

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._reader_lock:
            if self._reader.broken:
                self._reader = self._connect(autocommit=True)
            return self._reader.execute(_sql(sql), params).fetchall()


_SQL: dict[str, str] = {}


def _sql(sql: str) -> str:
    """The shared SQL with psycopg's placeholder (our statements hold no other `?` or `%`)."""
    if sql not in _SQL:
        _SQL[sql] = sql.replace("?", "%s")
    return _SQL[sql]


def _connect_error(url: str, exc: psycopg.OperationalError) -> ConfigError:
    detail = " ".join(str(exc).split())
    where = urlsplit(url)
    if "authentication failed" in detail or "no password supplied" in detail or "role" in detail:
        return ConfigError(f"the registry database refused the login for {where.username or 'the default user'} "
                           f"at {url}: {detail[:300]}",
                           "check the user and password in fleet.registry or PGPASSWORD / PGPASSFILE")
    if "database" in detail and "does not exist" in detail:
        return ConfigError(f"the registry database in {url} does not exist: {detail[:300]}",
                           "create it first: createdb -O USER DATABASE")
    return ConfigError(f"cannot reach the registry database at {where.hostname or 'the local socket'}:"
                       f"{where.port or 5432}: {detail[:300]}", "start PostgreSQL or fix fleet.registry")
