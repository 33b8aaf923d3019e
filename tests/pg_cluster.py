"""A real PostgreSQL 15 cluster for tests, started from Debian's postgresql package.

The cluster lives in a temporary directory owned by an unprivileged user (the
tests run as root, and PostgreSQL refuses to run as root): ``initdb`` and
``pg_ctl`` run through ``runuser``. It listens on a free loopback port and on
a unix socket inside its directory; logins over TCP need a generated password
(scram-sha-256), so the tests also see that the password never leaks.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.helpers import free_port

PG_BIN = Path(os.environ.get("SDS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "sds"
"""The database superuser the tests log in as."""
OS_USER = "sds-test"
"""The system user that owns and runs the cluster."""
START_TIMEOUT = 30.0


class PostgresMissing(RuntimeError):
    """PostgreSQL's binaries are not installed here."""


def available() -> bool:
    return all((PG_BIN / name).is_file() for name in ("initdb", "pg_ctl", "postgres", "psql"))


def _os_user() -> str:
    """The unprivileged system user running the cluster (created when missing, as root)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OS_USER],
            check=False,
            capture_output=True,
        )
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return "nobody"
    return OS_USER


class PgCluster:
    """One initdb'd cluster: start, stop (also ``-m immediate``), databases per test."""

    def __init__(self) -> None:
        if not available():
            raise PostgresMissing(f"PostgreSQL binaries not found in {PG_BIN}")
        self.user = _os_user()
        self.root = Path(tempfile.mkdtemp(prefix="sds-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_file = self.root / "postgres.log"
        self.password = secrets.token_urlsafe(18)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.finished: list[str] = []
        """Databases of finished tests, dropped before the next one is created."""
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.socket_dir.mkdir()
        self._chown(self.socket_dir)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            PG_USER,
            "--pwfile",
            str(pwfile),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
            timeout=120,
        )
        pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '{self.host}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "max_connections = 100\nshared_buffers = 16MB\nfsync = on\n"
            )

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, *command: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", self.user, "--"] if os.geteuid() == 0 else []
        result = subprocess.run(
            [*prefix, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{Path(command[0]).name} failed ({result.returncode}): "
                f"{result.stderr.strip()[-2000:]}"
            )
        return result

    def socket_url(self, database: str = "postgres") -> str:
        """A URL through the cluster's Unix socket (local logins need no password)."""
        return f"postgresql://{PG_USER}@/{database}?host={self.socket_dir}&port={self.port}"

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        secret = self.password if password is None else password
        return f"postgresql://{PG_USER}:{secret}@{self.host}:{self.port}/{database}"

    def start(self) -> None:
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "start",
            timeout=START_TIMEOUT + 10,
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``immediate`` is a crash without a shutdown checkpoint."""
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", timeout=60
        )

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL over the unix socket as the superuser; its output."""
        return self._run(
            str(PG_BIN / "psql"),
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            PG_USER,
            "-d",
            database,
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ).stdout

    def create_database(self) -> str:
        while self.finished:
            self.drop_database(self.finished.pop())
        name = "t_" + uuid.uuid4().hex[:16]
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def destroy(self) -> None:
        """Stop the server (if running) and remove its directory."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        deadline = time.monotonic() + 10
        while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)
