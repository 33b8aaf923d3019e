#!/usr/bin/env python3
"""Relay-only, SQLite and PostgreSQL side by side, with the shared load generator.

    python benchmarks/storage_modes.py --rounds 4 --out modes.jsonl relay sqlite pg pg-pinned
    python benchmarks/storage_modes.py --rounds 3 --out ab.jsonl pg@/path/to/old/tree pg

Each round runs every MODE once, in the order given (interleaved, so a machine
that gets busier affects all modes alike), through ``../shared/bench/run.sh``:
a fresh `sds serve` pinned to CPU 0, the generator pinned to CPU 1, fanout S=1
C=2 B=64 at max rate with ``--replay-check``. Modes:

* ``relay``: no persistence.
* ``sqlite``: a fresh ``--persist-dir``.
* ``pg``: a fresh database in a PostgreSQL 15 cluster this script initdb's into a
  temporary directory (as the test suite does: ``tests/pg_cluster.py``; run as
  root it runs the cluster as the unprivileged ``sds-test`` user), reached over
  TCP on loopback, with ownership in the database (the default). PostgreSQL is
  not pinned: its backends run on either CPU, the generator's included.
* ``pg-pinned``: the same, with PostgreSQL pinned to CPU 0 with the server, so the
  server side (relay and its storage) has one core in every mode, as SQLite's
  writer thread has with the server, and the generator keeps the other.
* ``pg-socket``: ``pg`` through the cluster's Unix socket instead of TCP.

``MODE@TREE`` runs the server from another source tree (another commit's
checkout) for a side-by-side comparison. Each result is the generator's JSON line,
labelled ``MODE#ROUND``, appended to ``--out``; a summary per mode is printed at the
end. The database URL travels in ``SDS_DATABASE_URL`` only; the JWT secret is
chosen by ``run.sh``. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.pg_cluster import PgCluster  # noqa: E402

SHARED_BENCH = ROOT.parent / "shared" / "bench"
SCENARIO = "fanout --stores 1 --clients 2 --bytes 64 --duration {duration} --replay-check"
MODES = ("relay", "sqlite", "pg", "pg-pinned", "pg-socket")


def pin_cluster(cluster: PgCluster, cpus: str) -> None:
    """Pin the postmaster (and so every backend it forks from now on) to ``cpus``."""
    pid = (cluster.data / "postmaster.pid").read_text().split()[0]
    subprocess.run(["taskset", "-a", "-cp", cpus, pid], check=True, stdout=subprocess.DEVNULL)


def run_mode(
    mode: str, tree: Path, label: str, args: argparse.Namespace, cluster: PgCluster | None
) -> dict[str, object] | None:
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("SDS_DATABASE_URL", None)
    extra = ""
    persist_dir = None
    database = None
    if mode == "sqlite":
        persist_dir = tempfile.mkdtemp(prefix="sds-modes-")
        extra = f"--persist-dir {persist_dir}"
    elif mode.startswith("pg"):
        assert cluster is not None
        every_cpu = f"0-{(os.cpu_count() or 1) - 1}"
        pin_cluster(cluster, "0" if mode == "pg-pinned" else every_cpu)
        database = cluster.create_database()
        url = cluster.socket_url(database) if mode == "pg-socket" else cluster.url(database)
        env["SDS_DATABASE_URL"] = url
    subprocess.run(["sync"], check=False)
    time.sleep(args.rest)
    python = tree / ".venv" / "bin" / "python"
    server = f"{python if python.exists() else sys.executable} -m sds serve --port {{PORT}} {extra}"
    try:
        result = subprocess.run(
            [
                str(args.bench / "run.sh"),
                "--port",
                str(args.port),
                "--label",
                label,
                "--server",
                server,
                "--out",
                str(args.out),
                SCENARIO.format(duration=args.duration),
            ],
            env=env,
            cwd=tree,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        if persist_dir:
            shutil.rmtree(persist_dir, ignore_errors=True)
        if database and cluster is not None:
            cluster.finished.append(database)
    lines = result.stdout.strip().splitlines()
    try:
        line: dict[str, object] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        print(f"{label}: no result\n{result.stderr[-1500:]}", file=sys.stderr)
        return None
    return line


def summary(results: dict[str, list[dict[str, object]]]) -> None:
    """Median deliveries/s per mode, and each as a share of relay-only's median."""
    medians = {
        mode: statistics.median(float(str(r["delivered_per_s"])) for r in runs)
        for mode, runs in results.items()
        if runs
    }
    relay = next((m for name, m in medians.items() if name.split("@")[0] == "relay"), None)
    for mode, runs in results.items():
        if mode not in medians:
            continue
        share = f"{medians[mode] / relay * 100:.0f} % of relay-only" if relay else ""
        replays = []
        for r in runs:
            replay = r.get("replay")
            if isinstance(replay, dict) and replay.get("distinct_replayed"):
                replays.append(f"{replay['distinct_replayed'] / replay['frames_sent']:.4f}")
        each = ", ".join(f"{float(str(r['delivered_per_s'])) / 1000:.1f} k" for r in runs)
        print(
            f"{mode:24s} {each}: median {medians[mode] / 1000:.1f} k {share}"
            + (f"; replayed {', '.join(replays)}" if replays else "")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modes", nargs="+", metavar="MODE[@TREE]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rest", type=float, default=3.0, help="seconds between runs")
    parser.add_argument("--port", type=int, default=3170)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bench", type=Path, default=SHARED_BENCH, help="the load generator")
    args = parser.parse_args()
    for spec in args.modes:
        if spec.partition("@")[0] not in MODES:
            parser.error(f"unknown mode {spec!r}; modes: {', '.join(MODES)}")
    cluster = None
    if any(spec.startswith("pg") for spec in args.modes):
        cluster = PgCluster()
        with (cluster.data / "postgresql.conf").open("a") as conf:
            conf.write("shared_buffers = 128MB\n")
        cluster.start()
    results: dict[str, list[dict[str, object]]] = {spec: [] for spec in args.modes}
    try:
        for round_ in range(args.rounds):
            for spec in args.modes:
                mode, _, tree = spec.partition("@")
                line = run_mode(mode, Path(tree or ROOT), f"{spec}#{round_}", args, cluster)
                if line is not None:
                    results[spec].append(line)
                    print(f"{spec}#{round_}: {float(str(line['delivered_per_s'])) / 1000:.1f} k")
    finally:
        if cluster is not None:
            cluster.destroy()
    summary(results)


if __name__ == "__main__":
    main()
