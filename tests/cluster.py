"""N real `sds serve` processes sharing a persist dir, behind a real HAProxy.

The HAProxy config is derived from the shipped deployment/haproxy/sds.cfg by
substitution only (ports, log target, stats socket, the TLS bind), so the routing
and health checking under test are the shipped ones. A round-robin variant
replaces ``balance uri path-only`` alone, for tests of a misconfigured proxy.

Every wait is bounded; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from sds.client import ClientClosed, StoreClient
from tests.deploy_tools import require_tool, stop, substitute, wait_for_port
from tests.helpers import TEST_SECRET as TEST_SECRET
from tests.helpers import ServerProcess, clean_env, free_port, http_get

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CONFIG = ROOT / "deployment" / "haproxy" / "sds.cfg"
SHIPPED_SERVERS = ("sds3001", "sds3002", "sds3003")
HEALTH_TIMEOUT = 15.0
"""How long HAProxy may take to see a process come or go (the shipped checks take ~2 s)."""


def haproxy_config(
    ports: Sequence[int],
    *,
    frontend_port: int,
    stats_socket: Path,
    balance: str = "uri",
) -> str:
    """The shipped HAProxy config, pointed at ``ports`` on loopback (one to three processes)."""
    if not 1 <= len(ports) <= len(SHIPPED_SERVERS):
        raise ValueError(f"the shipped config lists {len(SHIPPED_SERVERS)} processes")
    config = HAPROXY_CONFIG.read_text()
    config = substitute(config, "log /dev/log local0", "log stdout format raw local0")
    # A test process may not raise its file limit to what 20000 connections need.
    config = substitute(config, "maxconn 20000", "maxconn 2000")
    config = substitute(
        config,
        "stats socket /run/haproxy/admin.sock mode 600",
        f"stats socket {stats_socket} mode 600",
    )
    config = substitute(
        config,
        "bind :443 ssl crt /etc/haproxy/certs/sds.example.com.pem alpn h2,http/1.1",
        f"bind 127.0.0.1:{frontend_port}",
    )
    if balance == "roundrobin":
        config = substitute(config, "    balance uri path-only\n", "    balance roundrobin\n")
    elif balance != "uri":
        raise ValueError(f"unknown balance {balance!r}")
    for index, name in enumerate(SHIPPED_SERVERS):
        line = f"    server {name} 127.0.0.1:{name[3:]} check\n"
        new = f"    server {name} 127.0.0.1:{ports[index]} check\n" if index < len(ports) else ""
        config = substitute(config, line, new)
    return config


class Cluster:
    """``n`` sds processes on one persist dir and the HAProxy in front of them.

    With ``database_url`` the stores are in PostgreSQL instead, and the processes
    share a lock dir for ownership (``ownership_dir`` is where the locks are).

    ``processes[i]`` is HAProxy's server ``SHIPPED_SERVERS[i]``. ``http_url`` and
    ``ws_url`` are HAProxy's; a process's own URLs are on its ServerProcess.
    """

    def __init__(
        self,
        directory: Path,
        *,
        n: int = 3,
        balance: str = "uri",
        server_args: Sequence[str] = (),
        database_url: str | None = None,
        database_ownership: bool = False,
    ) -> None:
        self.directory = directory
        self.database_url = database_url if database_ownership else None
        """Set when ownership lives in the database (the processes share nothing else)."""
        self.persist_dir = directory / "persist"
        self.lock_dir = directory / "locks"
        self.log_dir = directory / "logs"
        self.env = clean_env(secret=TEST_SECRET)
        if database_url is None:
            self.persist_dir.mkdir(parents=True, exist_ok=True)
            storage_args = ["--persist-dir", str(self.persist_dir)]
            self.ownership_dir = self.persist_dir
        elif database_ownership:
            # As on separate machines: own working dirs, ownership in the database.
            self.env["SDS_DATABASE_URL"] = database_url
            storage_args = []  # ownership in the database: the default
            self.ownership_dir = self.lock_dir  # unused: see database_url
        else:
            # Stores in PostgreSQL, ownership in a lock dir of this machine. The URL
            # (with its password) travels in the environment, never on a command line.
            self.env["SDS_DATABASE_URL"] = database_url
            storage_args = ["--lock-dir", str(self.lock_dir)]
            self.ownership_dir = self.lock_dir
        self.processes = [
            ServerProcess(
                [*storage_args, *server_args],
                port=free_port(),
                env=self.env,
                cwd=_working_dir(directory / f"machine{i}") if database_ownership else directory,
                log_dir=self.log_dir,
            )
            for i in range(n)
        ]
        self.names = list(SHIPPED_SERVERS[:n])
        self.frontend_port = free_port()
        self.http_url = f"http://127.0.0.1:{self.frontend_port}"
        self.ws_url = f"ws://127.0.0.1:{self.frontend_port}"
        # A unix socket path must stay short: pytest's tmp dirs can be too long.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="sds-hap-"))
        self.stats_socket = self._socket_dir / "admin.sock"
        self.config_path = directory / "haproxy.cfg"
        self.config_path.write_text(
            haproxy_config(
                [p.port for p in self.processes],
                frontend_port=self.frontend_port,
                stats_socket=self.stats_socket,
                balance=balance,
            )
        )
        self.haproxy_log = directory / "haproxy.log"
        self.haproxy: subprocess.Popen[bytes] | None = None

    # -- starting and stopping -------------------------------------------------

    def start(self) -> Cluster:
        """Start every process, then HAProxy; return once HAProxy sees every process up."""
        for process in self.processes:
            process.start()
        for process in self.processes:
            process.wait_ready()
        self.start_proxy()
        for index in range(len(self.processes)):
            self.wait_proxy_sees(index, up=True)
        return self

    def __enter__(self) -> Cluster:
        """Started, stopped on exit (also when starting fails part-way)."""
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_proxy(self) -> None:
        binary = require_tool("haproxy")
        with self.haproxy_log.open("ab") as out:
            self.haproxy = subprocess.Popen(
                [binary, "-db", "-f", str(self.config_path)],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
            )
        wait_for_port(self.frontend_port, self.haproxy, self.haproxy_log)

    def stop_proxy(self) -> None:
        if self.haproxy is not None:
            stop(self.haproxy)

    def close(self) -> None:
        """Stop everything started (a stopped process is resumed first so it can exit)."""
        for process in self.processes:
            if process.process is not None and process.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.process.send_signal(signal.SIGCONT)
            process.kill()
        self.stop_proxy()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- one process -----------------------------------------------------------

    def sigkill(self, index: int) -> None:
        """SIGKILL process ``index`` and reap it: its flocks are released by the kernel."""
        process = self.processes[index]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def sigstop(self, index: int) -> None:
        self.processes[index].send_signal(signal.SIGSTOP)

    def sigcont(self, index: int) -> None:
        self.processes[index].send_signal(signal.SIGCONT)

    def sigterm(self, index: int) -> int:
        """SIGTERM process ``index``; its exit code (bounded wait)."""
        return self.processes[index].stop(signal.SIGTERM)

    def restart(self, index: int) -> None:
        """Start process ``index`` again on its port, same persist dir; wait for /healthz."""
        process = self.processes[index]
        process.start()
        process.wait_ready()

    # -- what HAProxy sees -----------------------------------------------------

    def admin(self, command: str, timeout: float = 5.0) -> str:
        """One command on HAProxy's stats socket; its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.stats_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def proxy_states(self) -> dict[str, str]:
        """HAProxy's status of each process (``UP``, ``DOWN``, ``UP 1/2`` ...) by server name."""
        table = self.admin("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(table))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "sds_relay" and row["svname"] in self.names
        }

    def wait_proxy_sees(self, index: int, *, up: bool, timeout: float = HEALTH_TIMEOUT) -> float:
        """Wait until HAProxy's health check has process ``index`` fully up (or down); seconds taken."""
        name = self.names[index]
        started = time.monotonic()
        deadline = started + timeout
        state = "?"
        while time.monotonic() < deadline:
            try:
                state = self.proxy_states().get(name, "?")
            except OSError as exc:  # the stats socket is briefly busy: ask again
                state = f"? ({exc})"
            if (state == "UP") if up else state.startswith("DOWN"):
                return time.monotonic() - started
            time.sleep(0.1)
        want = "UP" if up else "DOWN"
        raise TimeoutError(f"HAProxy still sees {name} as {state!r}, not {want}, after {timeout}s")

    async def wait_proxy_sees_async(
        self, index: int, *, up: bool, timeout: float = HEALTH_TIMEOUT
    ) -> float:
        """`wait_proxy_sees` off the event loop, for tests whose clients must keep running."""
        return await asyncio.to_thread(self.wait_proxy_sees, index, up=up, timeout=timeout)

    # -- helpers ---------------------------------------------------------------

    def token(self, store_id: str, scope: str = "write", sub: str = "tester") -> str:
        return self.processes[0].token(store_id, scope=scope, sub=sub)

    def metrics(self, index: int) -> str:
        """The /metrics text of process ``index`` (asked directly, not through HAProxy)."""
        status, body = http_get(f"{self.processes[index].http_url}/metrics")
        assert status == 200, body[:200]
        return body.decode()

    def routed_to(self, path: str) -> int:
        """Index of the process HAProxy routes ``path`` to, read from its log of a probe request."""
        seen = len(self.haproxy_log.read_text(errors="replace").splitlines())
        http_get(f"{self.http_url}{path}")
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            lines = self.haproxy_log.read_text(errors="replace").splitlines()[seen:]
            for line in lines:
                if f" {path} " in line and "sds_relay/" in line:
                    name = line.split("sds_relay/", 1)[1].split()[0]
                    if name in self.names:
                        return self.names.index(name)
            time.sleep(0.05)
        raise TimeoutError(f"no HAProxy log line for {path}")


def _working_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


class ReconnectingPeer:
    """A client of one store through the proxy that behaves like the SDS clients on a close.

    When its connection closes (or a connect fails) it waits ``delay`` and
    reconnects, at most ``max_attempts`` times in all. It reads every frame and
    keeps them in ``received``; ``send`` writes on the current connection, if any.
    """

    def __init__(
        self,
        base_url: str,
        store_id: str,
        token: str,
        *,
        delay: float = 0.3,
        max_attempts: int = 40,
    ) -> None:
        self.base_url = base_url
        self.store_id = store_id
        self.token = token
        self.delay = delay
        self.max_attempts = max_attempts
        self.received: list[bytes] = []
        self.connects = 0
        self.close_codes: list[int | None] = []
        self.failed_connects: list[str] = []
        self.client: StoreClient | None = None
        self.connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> ReconnectingPeer:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self, timeout: float = 10.0) -> None:
        """Close the connection and end the reconnect loop (bounded)."""
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, timeout)

    async def send(self, frame: bytes) -> bool:
        """Send on the current connection; False when there is none (the frame is not kept)."""
        client = self.client
        if client is None:
            return False
        try:
            await client.send(frame)
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            return False
        return True

    async def _run(self) -> None:
        attempts = 0
        while not self._stop.is_set():
            attempts += 1
            if attempts > self.max_attempts:
                raise RuntimeError(
                    f"{self.store_id}: more than {self.max_attempts} connects; failures: "
                    f"{self.failed_connects[-5:]}, closes: {self.close_codes[-5:]}"
                )
            client = StoreClient(self.base_url, self.store_id, self.token)
            try:
                await asyncio.wait_for(client.connect(), 10.0)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                status = getattr(exc, "status", None)
                self.failed_connects.append(f"{type(exc).__name__} {status or ''}".strip())
                await asyncio.sleep(self.delay)
                continue
            self.connects += 1
            self.client = client
            self.connected.set()
            try:
                while not self._stop.is_set():
                    try:
                        self.received.append(await client.receive(timeout=0.2))
                    except TimeoutError:
                        continue
                    except ClientClosed as closed:
                        self.close_codes.append(closed.code)
                        break
            finally:
                self.client = None
                self.connected.clear()
                await client.close()
            if not self._stop.is_set():
                await asyncio.sleep(self.delay)
