#!/usr/bin/env python3
"""sds_bench.py / run_suite.py JSON lines to Markdown tables (medians of repeated runs).

python benchmarks/summarize.py results.jsonl [more.jsonl ...]   (or JSON lines on stdin)
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def read_rows(texts: Iterable[str]) -> list[Row]:
    rows = []
    for text in texts:
        for line in text.splitlines():
            if line.strip().startswith("{"):
                rows.append(json.loads(line))
    return rows


def get(row: Row, path: str) -> Any:
    value: Any = row
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def median(rows: Sequence[Row], path: str) -> float | None:
    values = [v for v in (get(r, path) for r in rows) if isinstance(v, int | float)]
    return statistics.median(values) if values else None


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def kib_to_mib(x: float | None) -> float | None:
    return None if x is None else x / 1024


def group(rows: Sequence[Row], key: Callable[[Row], tuple[Any, ...]]) -> list[list[Row]]:
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return list(groups.values())


def table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    if not body:
        return ""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n\n"


def fanout_table(rows: Sequence[Row]) -> str:
    def key(r: Row) -> tuple[Any, ...]:
        p = r["params"]
        return (r.get("label"), r["scenario"], *sorted(p.items()))

    body = []
    for g in group(rows, key):
        p = g[0]["params"]
        persist = bool(get(g[0], "runner.persist"))
        replay = [r["replay"] for r in g if "replay" in r]
        body.append(
            [
                g[0].get("label") or "",
                g[0]["scenario"] + (" persist" if persist else ""),
                f"{p['stores']} x {p['clients_per_store']}",
                str(p["frame_bytes"]),
                str(p["rate_per_writer"]),
                str(len(g)),
                fmt(median(g, "deliveries_per_s")),
                fmt(median(g, "mib_per_s"), 1),
                fmt(median(g, "latency_ms.p50"), 2),
                fmt(median(g, "latency_ms.p99"), 2),
                str(sum(r["lost"] + r["out_of_order"] + r["echoed"] for r in g)),
                fmt(median(g, "server.cpu_pct")),
                fmt(median(g, "server.efficiency")),
                fmt(median(g, "generator.cpu_pct")),
                fmt(median(g, "machine.other_pct")),
                fmt(kib_to_mib(median(g, "server.rss_kib.peak"))),
                "-"
                if not replay
                else f"{sum(x['complete'] for x in replay)}/{len(replay)} complete",
            ]
        )
    head = [
        "label",
        "scenario",
        "S x C",
        "B",
        "rate/writer",
        "runs",
        "deliveries/s",
        "MiB/s",
        "p50 ms",
        "p99 ms",
        "lost+ooo+echo",
        "server CPU %",
        "deliveries/CPU-s",
        "generator CPU %",
        "other CPU %",
        "server RSS peak MiB",
        "replay",
    ]
    return table(head, body)


def connect_table(rows: Sequence[Row]) -> str:
    body = []
    for g in group(rows, lambda r: (r.get("label"), *sorted(r["params"].items()))):
        body.append(
            [
                g[0].get("label") or "",
                str(g[0]["params"]["connections"]),
                str(len(g)),
                fmt(median(g, "accepted")),
                fmt(median(g, "accepted_per_s")),
                str(sum(r["failed"] for r in g)),
                fmt(median(g, "handshake_ms.p99"), 1),
                fmt(median(g, "server.bytes_per_idle_connection")),
                fmt(median(g, "server.cpu_pct")),
                fmt(median(g, "machine.other_pct")),
            ]
        )
    head = [
        "label",
        "N",
        "runs",
        "accepted",
        "accepted/s",
        "failed",
        "handshake p99 ms",
        "bytes/idle conn",
        "server CPU %",
        "other CPU %",
    ]
    return table(head, body)


def replay_table(rows: Sequence[Row]) -> str:
    body = []
    for g in group(rows, lambda r: (r.get("label"), *sorted(r["params"].items()))):
        p = g[0]["params"]
        body.append(
            [
                g[0].get("label") or "",
                f"{p['stores']} x {p['patches']}",
                str(len(g)),
                f"{sum(bool(r['complete']) for r in g)}/{len(g)}",
                fmt(median(g, "writes_per_s")),
                fmt(median(g, "replay.seconds_max"), 3),
                fmt(median(g, "replay.frames_per_s")),
            ]
        )
    head = ["label", "stores x patches", "runs", "complete", "writes/s", "catch-up s", "frames/s"]
    return table(head, body)


def summarize(rows: Sequence[Row]) -> str:
    ok = [r for r in rows if not r.get("aborted")]
    out = fanout_table([r for r in ok if r["scenario"] in ("fanout", "latency")])
    out += connect_table([r for r in ok if r["scenario"] == "connect"])
    out += replay_table([r for r in ok if r["scenario"] == "replay"])
    for r in rows:
        if r.get("aborted"):
            out += f"- aborted: {r.get('scenario')} {get(r, 'runner.spec') or ''}: {r['aborted']}\n"
    return out


def main(argv: Sequence[str]) -> int:
    texts = [Path(f).read_text() for f in argv] if argv else [sys.stdin.read()]
    sys.stdout.write(summarize(read_rows(texts)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
