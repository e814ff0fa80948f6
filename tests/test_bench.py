"""The benchmark runs end to end at a tiny size, so that it cannot rot.

It asserts nothing about speed (speed goals live in the benchmark itself): only that
every scenario ran, the table was printed and the JSON file is complete.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import SCENARIOS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def test_the_bench_runs_every_scenario_and_writes_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--messages", "3000", "--repeat", "1", "--latency-seconds", "0.3", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--scenarios", ",".join(SCENARIOS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU us/msg" in proc.stdout
    for scenario in SCENARIOS.values():
        assert scenario.title in proc.stdout
    assert "forwarder core->core / bare relay" in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["machine"]["nproc"] >= 1
    assert set(doc["summary"]) == set(SCENARIOS)
    for key, summary in doc["summary"].items():
        assert summary["runs"] == 1, key
        assert summary["msgs_per_s"] > 0, key
        assert summary["cpu_us_per_msg"] >= 0, key  # a tiny run may stay under one 10 ms tick
        assert summary["peak_rss_mb"] > 0, key
        assert summary["latency_samples"] > 0, key
    assert {"core_vs_bare", "js_core_vs_bare_js", "accounting_cost_core"} <= set(doc["ratios"])
    assert all(run["error"] is None and run["exit_code"] == 0 for run in doc["runs"])
