"""benchmarks/cluster_efficiency.py: one process alone vs processes behind the shipped HAProxy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy_tools import require_tool
from tests.helpers import clean_env

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cluster_efficiency.py"


def test_cluster_efficiency_measures_both_setups_and_loses_nothing(tmp_path: Path) -> None:
    require_tool("haproxy")
    out = tmp_path / "eff.jsonl"
    fanout = ["--stores", "4", "--clients", "3", "--bytes", "64", "--rate", "20", "--duration", "1"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--processes", "2", "--out", str(out), "--", *fanout],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["setup"], r["processes"]) for r in runs] == [("single", 1), ("haproxy", 2)]
    for run in runs:
        assert run["lost"] == 0 and run["gaps"] == 0 and run["out_of_order"] == 0
        assert run["deliveries"] > 0 and run["server_cpu_s"] > 0
        assert run["efficiency"] == round(run["deliveries"] / run["server_cpu_s"])
    assert runs[0]["proxy_cpu_s"] == 0 and runs[1]["proxy_cpu_s"] >= 0
    # Routed by path through the shipped config: no connection needed a second process.
    assert runs[1]["forwarded_connections"] == 0
    assert "SDS_JWT_SECRET" not in out.read_text()
