#!/usr/bin/env python3
"""Run a benchmark suite: a fresh `sds serve` per scenario, pinned apart from the load generator.

    python benchmarks/run_suite.py --suite quick --port 3160 --out results.jsonl
    python benchmarks/run_suite.py --port 3160 --repeat 3 --out r.jsonl \\
        'fanout --stores 1 --clients 50 --bytes 256 --duration 10'
    python benchmarks/run_suite.py --port 3160 'fanout --clients 2 --bytes 64 --persist --replay-check'

The server runs on CPU 0 (taskset), sds_bench.py on CPU 1; the server gets --server-pid
measurement. A spec containing --persist gets a server with a fresh --persist-dir. The
server is stopped with SIGTERM (SIGKILL after 10 s) sent to the process group this
script created for it. Each result is one JSON line, annotated with "runner", printed
and appended to --out. The JWT secret is random per run and travels in the environment
only. `--server 'CMD'` benchmarks another server ({PORT} and {PERSIST_DIR} substituted;
SDS_PORT, SDS_HOST and SDS_JWT_SECRET exported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCH = HERE / "sds_bench.py"
SECRET_ENV = "SDS_JWT_SECRET"

SUITES: dict[str, list[str]] = {
    "quick": [
        "fanout --stores 1 --clients 2 --bytes 64 --duration 3",
        "fanout --stores 1 --clients 50 --bytes 256 --duration 3",
        "latency --stores 1 --clients 50 --bytes 256 --duration 3 --rate 200",
        "latency --stores 10 --clients 5 --bytes 256 --duration 3 --rate 100",
        "connect --connections 200 --hold 1",
        "replay --stores 1 --patches 2000 --persist",
    ],
    "full": [
        "fanout --stores 1 --clients 2 --bytes 64 --duration 10",
        "fanout --stores 1 --clients 2 --bytes 64 --duration 10 --persist --replay-check",
        "fanout --stores 1 --clients 50 --bytes 256 --duration 10",
        "latency --stores 1 --clients 50 --bytes 256 --duration 10 --rate 200",
        "fanout --stores 100 --clients 5 --bytes 256 --duration 10",
        "latency --stores 100 --clients 5 --bytes 256 --duration 10 --rate 20",
        "connect --connections 2000",
        "replay --stores 1 --patches 10000 --persist",
    ],
}


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def pin(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


class Server:
    """One server process in its own process group; a context manager that always stops it."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.cmd, self.env, self.port, self.log = cmd, env, port, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def __enter__(self) -> Server:
        if port_open(self.port):
            raise SystemExit(f"run_suite: port {self.port} is already in use")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not port_open(self.port):
            if self.proc.poll() is not None:
                raise SystemExit(f"run_suite: the server exited during start-up; see {self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"run_suite: port {self.port} not open after 30 s")
            time.sleep(0.1)
        time.sleep(0.3)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.returncode = self.proc.wait(5)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_command(template: str | None, port: int, persist_dir: Path | None) -> list[str]:
    if template is None:
        cmd = [sys.executable, "-m", "sds", "serve", "--host", "127.0.0.1", "--port", "{PORT}"]
        if persist_dir is not None:
            cmd += ["--persist-dir", "{PERSIST_DIR}"]
    else:
        cmd = shlex.split(template)
    subs = {"{PORT}": str(port), "{PERSIST_DIR}": str(persist_dir or "")}
    out = []
    for part in cmd:
        for key, value in subs.items():
            part = part.replace(key, value)
        out.append(part)
    return out


def run_one(spec: str, a: argparse.Namespace, secret: str, logdir: Path, n: int) -> dict[str, Any]:
    """Fresh server, one sds_bench.py run against it, server stopped; the annotated result."""
    args = shlex.split(spec)
    persist = "--persist" in args
    args = [x for x in args if x != "--persist"]
    persist_dir = Path(tempfile.mkdtemp(prefix="sds-bench-store-")) if persist else None
    env = {**os.environ, SECRET_ENV: secret, "SDS_PORT": str(a.port), "SDS_HOST": "127.0.0.1"}
    cmd = pin(a.server_cpu) + server_command(a.server, a.port, persist_dir)
    log = logdir / f"server-{n}.log"
    started = time.monotonic()
    try:
        with Server(cmd, env, a.port, log) as server:
            bench = [
                *pin(a.client_cpu),
                sys.executable,
                str(BENCH),
                *args,
                "--url",
                f"ws://127.0.0.1:{a.port}",
                "--server-pid",
                str(server.pid),
            ]
            if a.label:
                bench += ["--label", a.label]
            print(f"[run_suite] >>> {spec}", file=sys.stderr, flush=True)
            try:
                done = subprocess.run(bench, env=env, capture_output=True, timeout=900)
                stdout, rc = done.stdout.decode(), done.returncode
                sys.stderr.write(done.stderr.decode()[-2000:])
            except subprocess.TimeoutExpired:
                stdout, rc = "", -1
            alive = server.alive()
            server.stop()
            server_rc = server.returncode
    finally:
        if persist_dir is not None:
            shutil.rmtree(persist_dir, ignore_errors=True)
    lines = [x for x in stdout.splitlines() if x.startswith("{")]
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"scenario": args[0] if args else "?", "aborted": "sds_bench produced no JSON"}
    result["runner"] = {
        "spec": spec,
        "server_cmd": " ".join(server_command(a.server, a.port, None)[:4]) + " ...",
        "persist": persist,
        "pinned": None
        if a.server_cpu is None
        else {"server_cpu": a.server_cpu, "client_cpu": a.client_cpu},
        "bench_rc": rc,
        "server_alive_after": alive,
        "server_exit_code": server_rc,
        "wall_s": round(time.monotonic() - started, 1),
    }
    if not alive:
        print(f"[run_suite] WARNING: the server died during: {spec}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n", 1)[-1],
    )
    p.add_argument("specs", nargs="*", help="sds_bench.py arguments, one quoted string each")
    p.add_argument("--suite", choices=sorted(SUITES))
    p.add_argument("--port", type=int, default=3160)
    p.add_argument("--out", type=Path, help="append the JSON lines to this file")
    p.add_argument("--repeat", type=int, default=1, help="run every spec this many times")
    p.add_argument("--label")
    p.add_argument("--server", help="server command template (default: this sds serve)")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    a = p.parse_args(argv)
    specs = list(a.specs) + (SUITES[a.suite] if a.suite else [])
    if not specs:
        p.error("give --suite or at least one spec")
    if a.no_pin or shutil.which("taskset") is None:
        if not a.no_pin:
            print("[run_suite] taskset not found: running unpinned", file=sys.stderr)
        a.server_cpu = a.client_cpu = None
    secret = secrets.token_urlsafe(32)
    logdir = Path(tempfile.mkdtemp(prefix="sds-bench-logs-"))
    print(f"[run_suite] server logs in {logdir}", file=sys.stderr)
    n = 0
    for spec in specs:
        for _ in range(max(1, a.repeat)):
            n += 1
            result = run_one(spec, a, secret, logdir, n)
            line = json.dumps(result, separators=(",", ":"))
            print(line, flush=True)
            if a.out is not None:
                with open(a.out, "a") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
