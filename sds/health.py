"""``GET /healthz``: whether the server serves and stores, judged from real writes.

Storage counts as failing from a failed write until a later write succeeds. The
writes that count are the server's commits and a probe: 64 KiB written and
fsynced into the persist dir, in a thread, at most every ``PROBE_SECONDS`` and
only when /healthz asks. So a full disk stays reported after the clients of the
failing store left, and /healthz never touches the disk on the event loop.

The answer is unauthenticated: it names no store, file or path (the log does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path

from aiohttp import web

from sds.appkeys import CONFIG, HEALTH, METRICS, STATE, STORAGE
from sds.metrics import Metrics

log = logging.getLogger(__name__)

PROBE_SECONDS = 1.0
PROBE_BYTES = 64 * 1024
PROBE_FILE = ".sds-health-probe"
WRITE_FAILED = "storage write failed (details in the server log)"


class StorageHealth:
    """The outcome of the latest real write into the persist dir (commit or probe)."""

    def __init__(self, directory: Path, metrics: Metrics, *, interval: float = PROBE_SECONDS):
        self.directory = directory
        self.metrics = metrics
        self.interval = interval
        self.probe_ok_at = float("-inf")
        self.probe_problem: str | None = None
        self._probing: asyncio.Task[None] | None = None
        self._last_probe = float("-inf")

    async def problems(self) -> list[str]:
        """Why storage is not healthy (no names), probing first when the last probe is old."""
        if time.monotonic() - self._last_probe >= self.interval:
            if self._probing is None:
                self._probing = asyncio.create_task(self._probe())
            await asyncio.shield(self._probing)
        last_ok = max(self.probe_ok_at, self.metrics.commit_ok_at)
        problems = []
        if self.metrics.commit_failed_at > last_ok:
            problems.append(WRITE_FAILED)
        # Only a later probe clears a probe's failure: a commit into a file that is
        # already open says nothing about the persist dir (it may be gone or full).
        if self.probe_problem:
            problems.append(self.probe_problem)
        return problems

    async def _probe(self) -> None:
        # A success counts from when the probe began: a commit that failed while it
        # ran is not cleared by it.
        started = time.monotonic()
        try:
            await asyncio.to_thread(_write_probe, self.directory)
        except OSError as exc:
            problem = f"persist dir not writable: {exc.strerror or type(exc).__name__}"
            if self.probe_problem is None:
                log.error("health probe failed in %s: %s", self.directory, exc)
            self.probe_problem = problem
        else:
            if self.probe_problem is not None:
                log.warning("health probe succeeded again in %s", self.directory)
            self.probe_problem = None
            self.probe_ok_at = started
        finally:
            self._last_probe = time.monotonic()
            self._probing = None


def _write_probe(directory: Path) -> None:
    """Write, fsync and remove a file of real bytes in ``directory`` (OSError on failure)."""
    if not directory.is_dir():
        raise NotADirectoryError(20, "not a directory", str(directory))
    path = directory / PROBE_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            written = os.write(fd, os.urandom(PROBE_BYTES))
            if written != PROBE_BYTES:
                raise OSError(28, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


async def health(app: web.Application) -> tuple[bool, dict[str, object]]:
    """Whether the server serves and stores; the reasons when it does not."""
    config = app[CONFIG]
    problems: list[str] = []
    if app[STATE].shutting_down:
        problems.append("shutting down")
    storage_health = app.get(HEALTH)
    if storage_health is not None:
        problems.extend(await storage_health.problems())
    storage = app.get(STORAGE)
    # An open store file whose last commit failed, even if others' succeeded since.
    if storage is not None and storage.failures and WRITE_FAILED not in problems:
        problems.append(WRITE_FAILED)
    body: dict[str, object] = {
        "status": "ok" if not problems else "unavailable",
        "persistence": storage is not None,
        "storage": "postgresql" if config.database_url else "sqlite" if storage else "none",
        "sqlite_version": sqlite3.sqlite_version,
        "connections": app[METRICS].connections_open,
        "signal_connections": app[METRICS].signal_connections_open,
        "stores": app[METRICS].stores_open,
    }
    if problems:
        body["problems"] = problems
    return not problems, body


async def healthz_handler(request: web.Request) -> web.Response:
    """200 when serving and storage works, 503 with the reasons otherwise."""
    ok, body = await health(request.app)
    return web.json_response(body, status=200 if ok else 503)
