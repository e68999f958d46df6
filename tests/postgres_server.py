"""A real PostgreSQL for the tests and the benchmarks: Debian's `postgresql` package, `initdb` into a temporary
folder, run as an unprivileged user (PostgreSQL refuses root; as root we run it as the package's `postgres` user),
a free port on 127.0.0.1 and a socket folder of its own. Password logins over TCP (scram-sha-256), as in production.

`fsync=False` (the tests) skips flushing to disk: a killed coordinator does not lose what PostgreSQL acknowledged
either way; only a crash of the machine would. The benchmarks keep PostgreSQL's durable defaults.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER, PASSWORD = "restnet", "registry-secret"


def postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        raise RuntimeError(f"{name} not found: install Debian's postgresql package (./bootstrap test does)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, fsync: bool = False):
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="restnet-pg-"))
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._created = 0
        self._as = {}
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            account = pwd.getpwnam("postgres")
            self._as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self.root.chmod(0o700)

    def start(self) -> "PostgresServer":
        data, pwfile = self.root / "data", self.root / "pwfile"
        self._run_as_owner(lambda: pwfile.write_text(PASSWORD))
        subprocess.run([postgres_bin("initdb"), "-D", str(data), "-U", USER, "--pwfile", str(pwfile), "-E", "UTF8",
                        "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "--no-instructions"],
                       check=True, capture_output=True, **self._as)
        for attempt in range(5):  # the free port may be taken before PostgreSQL binds it: try another
            self.port = _free_port()
            self.log = self.root / "postgres.log"
            settings = {"listen_addresses": "127.0.0.1", "max_connections": "100", "fsync": "on" if self.fsync
                        else "off", "full_page_writes": "on" if self.fsync else "off"}
            args = [postgres_bin("postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.root)]
            for key, value in settings.items():
                args += ["-c", f"{key}={value}"]
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                             **self._as)
            if self._wait_ready(30):
                return self
            self.proc.wait()
        raise RuntimeError(f"PostgreSQL did not start: {self.log.read_text()[-2000:]}")

    def _run_as_owner(self, write) -> None:
        write()
        if self._as:
            for path in self.root.iterdir():
                os.chown(path, self._as["user"], self._as["group"])

    def _wait_ready(self, timeout: float) -> bool:
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def url(self, database: str, password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; its URL (with the password)."""
        import psycopg

        self._created += 1
        name = name or f"fleet_{self._created}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: PostgreSQL's smart shutdown; then fast if clients linger
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
