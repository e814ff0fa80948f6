"""The benchmark runs end to end at a tiny size, so that it cannot rot.

It asserts nothing about speed (speed goals live in the benchmark itself): only that
every scenario ran, the table was printed and the JSON file is complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import SCENARIOS, latency_line, latency_verdict, slow_intervals, soak_line

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
        assert summary["live_msgs_per_s"] > 0, key  # the latency runs' basis
    assert {"core_vs_bare", "js_core_vs_bare_js", "accounting_cost_core"} <= set(doc["ratios"])
    verdict = doc["ratios"]["latency_goal"]
    assert set(verdict["forwarder_p99_ms"]) == {"fwd-core", "fwd-js-core", "fwd-js-js"}
    assert set(verdict["yardsticks_p99_ms"]) == {"bare-core", "bare-js", "raw-ceiling"}
    assert set(verdict["before_relay_p99_ms"]) == {"fwd-core", "fwd-js-core", "fwd-js-js"}
    assert set(verdict["relay_hop_p99_ms"]) == {"fwd-core", "fwd-js-core", "fwd-js-js"}
    assert all(0 < busy <= doc["machine"]["nproc"] for busy in verdict["machine_busy"].values())
    assert set(verdict["source_server_cores"]) == {"fwd-core", "fwd-js-core", "fwd-js-js"}
    assert all(0 <= share <= 1 for share in verdict["behind_at_end"].values())
    assert "latency p99 at 0.50x live max rate" in proc.stdout
    assert all(run["error"] is None and run["exit_code"] == 0 for run in doc["runs"])


def test_the_soak_tells_the_intervals_where_the_relay_fell_behind_from_the_others() -> None:
    # (seconds, RSS, arrived, relay CPU s, machine busy s, iowait s, steal s), rate 1000/s
    samples = [
        (0.0, 1, 0, 0.0, 0.0, 0.0, 0.0),
        (5.0, 1, 5000, 2.5, 5.0, 0.0, 0.0),  # steady: 1000/s, half a core
        (10.0, 1, 7000, 3.0, 14.0, 1.0, 2.0),  # slow: 400/s, the machine busy, steal
        (15.0, 1, 12000, 5.5, 19.0, 1.0, 2.0),  # steady again
    ]
    result = slow_intervals(samples, 1000.0)
    assert (result["count"], result["of"]) == (1, 3)
    assert result["slow"] == {
        "msgs_per_s": 400.0, "relay_cores": 0.1, "machine_busy_cores": 1.8,
        "iowait_cores": 0.2, "steal_cores": 0.4,
    }  # fmt: skip
    assert result["steady"]["msgs_per_s"] == 1000.0
    line = soak_line({
        "rss_mb_at_warmup": 1.0, "rss_mb_peak_after_warmup": 1.0, "rss_mb_last": 1.0,
        "flat_within_10pct": True, "latency": {}, "slow_intervals": result,
    })  # fmt: skip
    assert "1 of 3 intervals below 90% of the rate; slow: 400 msg/s, relay 0.10 cores" in line


def test_the_latency_verdict_judges_the_worst_forwarder_mode_and_skips_modes_without_a_latency_run() -> None:
    nan = float("nan")
    summary = {
        "fwd-core": {
            "latency_p99_ms": 3.0,
            "latency_rate": 40_000.0,
            "latency_source_p99_ms": 1.2,
            "latency_relay_hop_p99_ms": 1.9,
            "latency_machine_busy": 1.25,
            "latency_source_cores": 0.3,
        },
        "fwd-js-core": {
            "latency_p99_ms": 4.9,
            "latency_source_p99_ms": 1.4,
            "latency_machine_busy": 1.5,
            "latency_behind_at_end": 0.25,
        },
        "fwd-js-js": {"latency_p99_ms": nan},  # --latency-seconds 0, or the run failed
        "bare-core": {"latency_p99_ms": 2.5, "latency_rate": 36_400.0},
        "raw-ceiling": {"runs": 0},
    }
    verdict = latency_verdict(summary, 0.5)
    assert verdict is not None
    assert verdict["met"] is True
    assert verdict["forwarder_p99_ms"] == {"fwd-core": 3.0, "fwd-js-core": 4.9}
    assert verdict["yardsticks_p99_ms"] == {"bare-core": 2.5}
    assert latency_line(verdict).splitlines() == [
        "latency p99 at 0.50x live max rate      core 3.0 ms at 40k/s, JS->core 4.9 ms  (goal < 5 ms: met)",
        "  the yardsticks in the same run        bare relay 2.5 ms at 36k/s",
        "  before the relay (source subscriber)  core 1.2 ms, JS->core 1.4 ms",
        "  the relay hop alone (target - source) core 1.9 ms",
        f"{f'  cores busy meanwhile, of {os.cpu_count()}':<40}core 1.25 (0.30 source server), JS->core 1.50",
        "  behind as the producer stops          JS->core 25.0%",
    ]
    summary["fwd-js-js"]["latency_p99_ms"] = 5.0  # the goal is strictly under 5 ms
    verdict = latency_verdict(summary, 0.25)
    assert verdict is not None
    assert verdict["met"] is False
    assert "(goal < 5 ms: MISSED)" in latency_line(verdict)
    no_latency_run = {"fwd-core": {"latency_p99_ms": nan}, "bare-core": {"latency_p99_ms": 1.0}}
    assert latency_verdict(no_latency_run, 0.5) is None
