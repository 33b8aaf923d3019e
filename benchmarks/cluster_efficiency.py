#!/usr/bin/env python3
"""Deliveries per server CPU-second: one `sds serve` alone vs N behind HAProxy, side by side.

    python benchmarks/cluster_efficiency.py --processes 3 --repeat 3 --out cluster.jsonl \\
        -- --stores 30 --clients 5 --bytes 256 --rate 100 --duration 10

For each repetition, two setups run the same `sds_bench.py fanout` arguments (after
``--``): ``single`` (the generator talks to one process directly) and ``haproxy``
(N processes sharing a persist dir, or relay only sharing a lock dir, behind
HAProxy configured from deployment/haproxy/sds.cfg by substitution). The CPU time
(utime + stime from /proc) of every sds process is summed over the whole bench
run; ``efficiency`` = stamped frames delivered in the run / that CPU time. HAProxy's own CPU is
reported beside it (``proxy_cpu_s``), not included; ``forwarded_connections``
counts connections that reached a process not owning their store (0 when
routing by path works: no extra hop). Loopback only; the JWT secret
is random and travels in the environment only. One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCH = HERE / "sds_bench.py"
HAPROXY_CONFIG = HERE.parent / "deployment" / "haproxy" / "sds.cfg"
SHIPPED_SERVERS = ("sds3001", "sds3002", "sds3003")
START_TIMEOUT = 20.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (from /proc/PID/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def forwarded_opened(port: int) -> int:
    """Connections a process forwarded to another owner (its /metrics counter)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("sds_forwarded_connections_opened_total "):
            return int(float(line.split()[1]))
    return 0


def wait_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} not listening on {port} after {START_TIMEOUT}s")


def haproxy_config(ports: list[int], frontend_port: int, stats_socket: Path) -> str:
    """The shipped config pointed at ``ports`` (the routing and checks are the shipped ones)."""
    config = HAPROXY_CONFIG.read_text()
    replacements = {
        "log /dev/log local0": "log stdout format raw local0",
        "maxconn 20000": "maxconn 4000",
        "stats socket /run/haproxy/admin.sock": f"stats socket {stats_socket}",
        "bind :443 ssl crt /etc/haproxy/certs/sds.example.com.pem alpn h2,http/1.1": (
            f"bind 127.0.0.1:{frontend_port}"
        ),
    }
    for old, new in replacements.items():
        if config.count(old) != 1:
            raise SystemExit(f"{HAPROXY_CONFIG}: expected {old!r} once")
        config = config.replace(old, new)
    for index, name in enumerate(SHIPPED_SERVERS):
        line = f"    server {name} 127.0.0.1:{name[3:]} check\n"
        new = f"    server {name} 127.0.0.1:{ports[index]} check\n" if index < len(ports) else ""
        config = config.replace(line, new)
    return config


def start_servers(
    count: int, workdir: Path, env: dict[str, str], persist: bool
) -> list[subprocess.Popen[bytes]]:
    shared = workdir / ("persist" if persist else "locks")
    shared.mkdir(parents=True, exist_ok=True)
    option = "--persist-dir" if persist else "--lock-dir"
    processes = []
    for _ in range(count):
        port = free_port()
        log = (workdir / f"sds-{port}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "sds", "serve", "--port", str(port), option, str(shared)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process.port = port  # type: ignore[attr-defined]
        processes.append(process)
    for process in processes:
        wait_port(process.port, process, "sds serve")  # type: ignore[attr-defined]
    return processes


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def run_bench(url: str, bench_args: list[str], env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(BENCH), "fanout", "--url", url, *bench_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"sds_bench failed ({result.returncode}): {result.stderr[-2000:]}")
    return dict(json.loads(lines[-1]))


def measure(
    setup: str, count: int, bench_args: list[str], env: dict[str, str], persist: bool
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"sds-cluster-{setup}-"))
    haproxy: subprocess.Popen[bytes] | None = None
    servers = start_servers(count, workdir, env, persist)
    try:
        url = f"ws://127.0.0.1:{servers[0].port}"  # type: ignore[attr-defined]
        if setup == "haproxy":
            binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
            frontend = free_port()
            config = workdir / "haproxy.cfg"
            ports = [s.port for s in servers]  # type: ignore[attr-defined]
            config.write_text(haproxy_config(ports, frontend, workdir / "admin.sock"))
            haproxy = subprocess.Popen(
                [binary, "-db", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=(workdir / "haproxy.log").open("ab"),
                stderr=subprocess.STDOUT,
            )
            wait_port(frontend, haproxy, "haproxy")
            time.sleep(3.0)  # every server passes its first health checks (rise 2, inter 1s)
            url = f"ws://127.0.0.1:{frontend}"
        before = [cpu_seconds(s.pid) for s in servers]
        proxy_before = cpu_seconds(haproxy.pid) if haproxy else 0.0
        report = run_bench(url, [*bench_args, "--label", setup], env)
        server_cpu = sum(cpu_seconds(s.pid) - b for s, b in zip(servers, before, strict=True))
        proxy_cpu = cpu_seconds(haproxy.pid) - proxy_before if haproxy else 0.0
        forwarded = sum(forwarded_opened(s.port) for s in servers)  # type: ignore[attr-defined]
    finally:
        if haproxy is not None:
            stop(haproxy)
        for server in servers:
            stop(server)
        shutil.rmtree(workdir, ignore_errors=True)
    # Every stamped frame received over the run, as the CPU time covers the whole run.
    deliveries = float(report["delivered_total"])
    return {
        "setup": setup,
        "processes": count,
        "persist": persist,
        "bench_args": bench_args,
        "deliveries": round(deliveries),
        "deliveries_per_s": report["deliveries_per_s"],
        "server_cpu_s": round(server_cpu, 3),
        "proxy_cpu_s": round(proxy_cpu, 3),
        "efficiency": round(deliveries / server_cpu) if server_cpu > 0 else None,
        "forwarded_connections": forwarded,
        "lost": report.get("lost"),
        "gaps": report.get("gaps"),
        "out_of_order": report.get("out_of_order"),
        "generator_saturated": report.get("generator", {}).get("saturated"),
        "machine_other_pct": report.get("machine", {}).get("other_pct"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=3, choices=(2, 3))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--persist", action="store_true", help="share a persist dir")
    parser.add_argument("--out", type=Path, help="append the JSON lines here")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then fanout options")
    args = parser.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDS_")}
    env["SDS_JWT_SECRET"] = secrets.token_urlsafe(48)
    for _ in range(args.repeat):
        for setup, count in (("single", 1), ("haproxy", args.processes)):
            line = json.dumps(measure(setup, count, bench_args, env, args.persist))
            print(line, flush=True)
            if args.out is not None:
                with args.out.open("a") as out:
                    out.write(line + "\n")


if __name__ == "__main__":
    main()
