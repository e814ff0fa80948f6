"""The latency probe: subscribes on every target to a sample of the assets and records, for
each message it sees, receipt time minus the send stamp in the payload.

Listening to a sample (every Nth asset, spread over all clusters by the hash) keeps
the probe's own CPU small on a 2-core machine while still seeing thousands of
messages a run. Run as ``python -m bench.latency --target URL ... --asset ID ...``;
prints ``ready`` once subscribed; when its stdin closes it prints one JSON line
(count and percentiles in milliseconds) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import nats
import uvloop

from bench.load import STAMP_AT, STAMP_LEN


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[k])


def summary(latencies_ns: list[int]) -> dict[str, Any]:
    values = sorted(latencies_ns)
    ms = 1e6
    return {
        "count": len(values),
        "p50_ms": percentile(values, 0.50) / ms,
        "p90_ms": percentile(values, 0.90) / ms,
        "p99_ms": percentile(values, 0.99) / ms,
        "max_ms": (values[-1] / ms) if values else float("nan"),
    }


async def run(args: argparse.Namespace) -> int:
    latencies: list[int] = []
    now = time.monotonic_ns
    end = STAMP_AT + STAMP_LEN

    async def on_msg(msg: Any) -> None:
        latencies.append(now() - int(msg.data[STAMP_AT:end]))

    conns = []
    for url in args.target:
        nc = await nats.connect(url, name="bench-latency-probe")
        for asset in args.asset:
            await nc.subscribe(f"{args.prefix}.{asset}.>", cb=on_msg)
        await nc.flush()
        conns.append(nc)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes our stdin
    for nc in conns:
        await nc.drain()
    print(json.dumps(summary(latencies)), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.latency")
    p.add_argument("--target", action="append", required=True)
    p.add_argument("--asset", action="append", required=True)
    p.add_argument("--prefix", default="assets")
    return int(uvloop.run(run(p.parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())
