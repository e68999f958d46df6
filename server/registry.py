"""The device registry, chosen by `fleet.registry`: embedded SQLite (the default) or a shared PostgreSQL.

    fleet.db, /var/lib/restnet/fleet.db      a SQLite file (a bare path, as before)
    sqlite:///fleet.db, sqlite:////abs/path  the same as a URL (three slashes, then the path: relative or /absolute)
    postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=...]   PostgreSQL (also postgres://); the password
                                             may come from PGPASSWORD or PGPASSFILE instead (libpq's environment)

`server.registry_base` holds the rows, the SQL and the promises; each backend the engine's part.
"""
from __future__ import annotations

from server.registry_base import LIFECYCLE, PRESENCE, REQUESTS_KEPT, DeviceRow, Registry
from server.registry_postgres import PostgresRegistry
from server.registry_sqlite import SqliteRegistry
from shared.errors import ConfigError

__all__ = ["DeviceRow", "Registry", "LIFECYCLE", "PRESENCE", "REQUESTS_KEPT", "open_registry", "is_shared_url"]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_shared_url(url: str) -> bool:
    """Does this registry URL name a database several coordinators can share?"""
    return url.startswith(POSTGRES_SCHEMES)


def open_registry(url: str) -> Registry:
    """The registry `fleet.registry` names, schema brought up to date; ConfigError when it cannot be used."""
    if is_shared_url(url):
        return PostgresRegistry(url)
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
            raise ConfigError(f"fleet.registry {url!r} is not a SQLite URL",
                              "sqlite:///relative/path.db or sqlite:////absolute/path.db")
        return SqliteRegistry(url[len("sqlite:///"):], url)
    if "://" in url:
        raise ConfigError(f"fleet.registry {url!r}: unknown kind of registry",
                          "a SQLite path (fleet.db, sqlite:///fleet.db) or postgresql://USER@HOST:PORT/DATABASE")
    return SqliteRegistry(url)
