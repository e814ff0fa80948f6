"""``workers: N``: a supervisor and N forwarder processes, against real nats-server processes."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from forwarder.embedded import pid_alive
from tests.helpers import async_wait_until, wait_until
from tests.integration.harness import (
    ForwarderProcess,
    TargetCollector,
    asset_of,
    parse_metrics,
    publish_assets,
    write_config,
)

pytestmark = pytest.mark.integration


def worker_pids(supervisor: int) -> list[int]:
    pids: list[int] = []
    for task in os.listdir(f"/proc/{supervisor}/task"):
        try:
            with open(f"/proc/{supervisor}/task/{task}/children") as fh:
                pids += [int(p) for p in fh.read().split()]
        except OSError:
            continue
    return sorted(pids)


def by_worker(metrics: dict[str, float], name: str) -> dict[str, float]:
    """``name{worker="i",...}`` samples summed per worker."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith(name + "{") and 'worker="' in key:
            worker = key.split('worker="', 1)[1].split('"', 1)[0]
            out[worker] = out.get(worker, 0.0) + value
    return out


@pytest.fixture
def fwd(tmp_path: Path):
    started: list[ForwarderProcess] = []

    def start(config: Path, *args: str) -> ForwarderProcess:
        proc = ForwarderProcess(config, tmp_path / "fwd.log", args=list(args)).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        pids = worker_pids(proc.proc.pid) if proc.proc is not None and not proc.exited else []
        proc.stop()
        for pid in pids:  # a failed test must not leave a worker behind either
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_two_workers_share_the_work_survive_a_crash_and_stop_on_sigterm(nats, fwd, tmp_path):
    source = nats.server(name="source")
    targets = {"C1": nats.server(name="c1"), "C2": nats.server(name="c2")}
    config = write_config(
        tmp_path / "f.yaml",
        source.url,
        {n: t.url for n, t in targets.items()},
        workers=2,
        log={"level": "info"},
    )
    proc = fwd(config).wait_ready()
    assert proc.proc is not None
    supervisor = proc.proc.pid
    workers = wait_until(lambda: len(worker_pids(supervisor)) == 2 and worker_pids(supervisor), 10)

    # /readyz is the supervisor's, 200 only with every worker ready; workers share the queue group.
    status, body = proc.get("/readyz")
    assert status == 200, body
    collector = TargetCollector()
    for name, target in targets.items():
        await collector.watch(name, [target.url])
    try:
        ids = await publish_assets(source.url, 4000, 200)
        await collector.wait_count(len(ids))
        got = sorted(data.decode() for msgs in collector.received.values() for _, data in msgs)
        assert got == sorted(ids)  # everything, once
        route = proc.json(f"/route/{asset_of('assets.asset-00001.value')}")
        assert route["cluster"] in targets
        metrics = proc.metrics()
        received = by_worker(metrics, "forwarder_messages_received_total")
        assert set(received) == {"1", "2"}
        assert sum(received.values()) == len(ids), received
        assert all(v > 0 for v in received.values()), received  # both workers took a share
        assert metrics["forwarder_workers"] == 2
        assert metrics['forwarder_worker_up{worker="1"}'] == 1

        # A SIGKILLed worker is restarted, and the service is ready again.
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: proc.get("/readyz")[0] == 503, 5, message="readyz did not notice the dead worker")
        wait_until(
            lambda: len(worker_pids(supervisor)) == 2 and workers[0] not in worker_pids(supervisor),
            15,
            message="the killed worker was not restarted",
        )
        proc.wait_ready()
        assert proc.metric('forwarder_worker_restarts_total{worker="1"}') == 1
        events = proc.log_events()
        assert any(e.get("event") == "worker_exited" and "SIGKILL" in str(e.get("how")) for e in events)
        more = await publish_assets(source.url, 2000, 200, start=len(ids))
        await collector.wait_count(len(ids) + len(more))

        # SIGTERM reaches every worker; the supervisor exits 0 only when each of them exited 0.
        current = worker_pids(supervisor)
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.log_tail()
        await async_wait_until(lambda: not any(pid_alive(p) for p in current), 5)
        stopped = [e for e in proc.log_events() if e.get("event") == "supervisor_stopped"]
        assert stopped, proc.log_tail()
        assert stopped[-1]["failed"] is None
    finally:
        await collector.close()


async def test_workers_flag_overrides_the_config_and_metrics_carry_a_worker_label(nats, fwd, tmp_path):
    source = nats.server(name="source")
    target = nats.server(name="c1")
    config = write_config(tmp_path / "f.yaml", source.url, {"C1": target.url})
    proc = fwd(config, "--workers", "3")
    assert proc.proc is not None
    supervisor = proc.proc.pid
    try:
        proc.wait_ready()
        wait_until(lambda: len(worker_pids(supervisor)) == 3, 10)
        text = proc.get("/metrics")[1].decode()
        metrics = parse_metrics(text)
        assert set(by_worker(metrics, "forwarder_source_connected")) == {"1", "2", "3"}
        assert text.count("# TYPE forwarder_messages_received_total counter") == 1  # one family
        clusters = proc.json("/clusters")
        assert set(clusters["workers"]) == {"1", "2", "3"}
        assert clusters["workers"]["2"]["clusters"]["C1"]["connected"] is True
    finally:
        assert proc.stop() == 0


async def test_two_workers_share_the_durable_consumer_and_a_killed_one_loses_nothing(nats, fwd, tmp_path):
    from tests.integration.test_jetstream import add_stream, publish_source, read_stream, wait_stream

    source = nats.server(name="source", jetstream=True)
    target = nats.server(name="c1", jetstream=True)
    await add_stream([source.url], "ASSETS", ["assets.>"])
    await add_stream([target.url], "OUT", ["assets.>"])
    config = write_config(
        tmp_path / "f.yaml",
        source.url,
        {"C1": {"servers": [target.url], "jetstream": {"ack_timeout": 1}}},
        source={"jetstream": {"stream": "ASSETS", "durable": "fwd", "ack_wait": 2}},
        workers=2,
    )
    proc = fwd(config).wait_ready()
    assert proc.proc is not None
    workers = wait_until(lambda: len(worker_pids(proc.proc.pid)) == 2 and worker_pids(proc.proc.pid), 10)
    publishing = asyncio.ensure_future(publish_source(source.url, 6000, rate=4000))
    try:
        await async_wait_until(
            lambda: len(by_worker(proc.metrics(), "forwarder_messages_received_total")) == 2, 10
        )
        os.kill(workers[1], signal.SIGKILL)  # mid-stream: its unacknowledged messages come back
        await publishing
        await wait_stream([target.url], "OUT", 6000, timeout=30)
        data = sorted(d.decode() for _, d in await read_stream([target.url], "OUT"))
        assert data == sorted(f"m{i:07d}" for i in range(6000))  # every one, once (Nats-Msg-Id)
        received = by_worker(proc.metrics(), "forwarder_messages_received_total")
        assert set(received) == {"1", "2"}
    finally:
        publishing.cancel()
    assert proc.stop() == 0


async def test_sources_creating_the_same_durable_at_once_share_its_messages(nats, tmp_path):
    """Workers (or replicas) start together: each finds no consumer and creates it. All must
    end up on one consumer and share its messages (with random deliver inboxes the last
    create moved the consumer to its own inbox and the others received nothing)."""
    from forwarder.config import load_config
    from forwarder.source import JetStreamSource
    from tests.integration.test_jetstream import add_stream, publish_source

    source = nats.server(name="source", jetstream=True)
    await add_stream([source.url], "ASSETS", ["assets.>"])
    config = write_config(
        tmp_path / "f.yaml",
        source.url,
        {"C1": "nats://127.0.0.1:1"},
        source={"jetstream": {"stream": "ASSETS"}},
    )
    settings = load_config(config).source
    a, b = JetStreamSource(settings), JetStreamSource(settings)
    got = {"a": 0, "b": 0}

    def counter(name: str):  # type: ignore[no-untyped-def]
        async def handle(msg) -> None:  # type: ignore[no-untyped-def]
            got[name] += 1
            await msg.ack()

        return handle

    await a.connect()
    await b.connect()
    try:
        await asyncio.gather(
            a._consume("ASSETS", "shared", "assets.>", counter("a")),
            b._consume("ASSETS", "shared", "assets.>", counter("b")),
        )
        await publish_source(source.url, 2000, rate=20000)
        await async_wait_until(lambda: got["a"] + got["b"] >= 2000, 10, message=lambda: str(got))
        assert got["a"] > 0, got
        assert got["b"] > 0, got
    finally:
        await a.close()
        await b.close()
