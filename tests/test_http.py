"""The HTTP port: ``respond()`` for every endpoint and error, and a real server on a free port.

``respond()`` is pure: a fake provider stands in for the service. The server tests talk
to a real ``HttpServer`` (on the test's loop) and a real ``HttpThread`` (its own loop in
a thread, as the service runs it) over loopback sockets.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import pytest

from forwarder import http
from forwarder.http import MAX_ASSET_BYTES, MAX_REQUEST_BYTES, HttpServer, HttpThread
from forwarder.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tests.helpers import async_wait_until


class FakeProvider:
    """A StatusProvider with settable answers; counts the calls it gets."""

    def __init__(self) -> None:
        self.ready = True
        self.alive: bool | None = None  # None: no liveness method at all
        self.metrics_body = b"# HELP forwarder_x x\nforwarder_x 1.0\n"
        self.routed: list[str] = []
        self.fail_with: Exception | None = None

    def metrics(self) -> bytes:
        if self.fail_with is not None:
            raise self.fail_with
        return self.metrics_body

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        if self.ready:
            return True, {"ready": True}
        return False, {"ready": False, "not_ready": {"C2": "not connected: connection refused"}}

    def route(self, asset: str) -> dict[str, Any]:
        self.routed.append(asset)
        return {"asset": asset, "cluster": "C1", "servers": ["nats://***@c1:4222"]}

    def clusters_state(self) -> dict[str, Any]:
        return {"clusters": {"C1": {"name": "C1", "connected": True}}, "source": {"subscribed": True}}

    def __getattr__(self, name: str) -> Any:
        # ``liveness`` exists only when a test sets ``alive``: HttpServer must work without it.
        if name == "liveness" and self.__dict__.get("alive") is not None:
            alive = self.__dict__["alive"]
            return lambda: (alive, {"status": "ok" if alive else "stalled"})
        raise AttributeError(name)


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def server(provider: FakeProvider) -> HttpServer:
    return HttpServer("127.0.0.1", 0, provider)


def body(response: tuple[int, str, bytes]) -> Any:
    return json.loads(response[2])


# ------------------------------------------------------------------ respond(): pure


def test_metrics_is_the_providers_exposition_with_the_prometheus_content_type(server, provider):
    status, ctype, payload = server.respond("GET", "/metrics")
    assert (status, ctype, payload) == (200, METRICS_CONTENT_TYPE, provider.metrics_body)


def test_a_query_string_is_ignored(server, provider):
    assert server.respond("GET", "/metrics?name[]=forwarder_x")[2] == provider.metrics_body


def test_healthz_answers_ok_without_a_liveness_check(server):
    response = server.respond("GET", "/healthz")
    assert response[:2] == (200, "application/json")
    assert body(response) == {"status": "ok"}


def test_healthz_is_503_when_the_provider_reports_a_stalled_loop(server, provider):
    provider.alive = False
    response = server.respond("GET", "/healthz")
    assert response[0] == 503
    assert body(response) == {"status": "stalled"}
    provider.alive = True
    assert server.respond("GET", "/healthz")[0] == 200


def test_readyz_is_200_when_ready_and_503_naming_what_is_not(server, provider):
    assert server.respond("GET", "/readyz")[0] == 200
    provider.ready = False
    response = server.respond("GET", "/readyz")
    assert response[:2] == (503, "application/json")
    assert body(response)["not_ready"] == {"C2": "not connected: connection refused"}


def test_clusters_is_the_providers_state(server, provider):
    response = server.respond("GET", "/clusters")
    assert response[:2] == (200, "application/json")
    assert body(response) == provider.clusters_state()


def test_route_percent_decodes_the_asset(server, provider):
    response = server.respond("GET", "/route/pump%2F7%20%C3%A4")
    assert response[0] == 200
    assert body(response)["asset"] == "pump/7 ä"
    assert provider.routed == ["pump/7 ä"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("/route/", "empty asset id"),
        ("/route/%ff%fe", "asset id is not valid UTF-8"),
        ("/route/" + "a" * (MAX_ASSET_BYTES + 1), f"asset id longer than {MAX_ASSET_BYTES} bytes"),
    ],
    ids=["empty", "not-utf8", "too-long"],
)
def test_route_rejects_an_unusable_asset_with_400(server, provider, target, message):
    response = server.respond("GET", target)
    assert response[0] == 400
    assert body(response) == {"error": message}
    assert provider.routed == []


def test_route_accepts_an_asset_of_exactly_the_limit(server):
    assert server.respond("GET", "/route/" + "a" * MAX_ASSET_BYTES)[0] == 200


@pytest.mark.parametrize("target", ["/", "/metrics/", "/route", "/healthz/x", "/../metrics"])
def test_unknown_paths_are_404(server, target):
    response = server.respond("GET", target)
    assert response[0] == 404
    assert body(response) == {"error": "no such endpoint"}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "get"])
def test_methods_other_than_get_and_head_are_405(server, method):
    response = server.respond(method, "/metrics")
    assert response[0] == 405
    assert body(response) == {"error": "only GET and HEAD"}


def test_head_gets_the_same_response_as_get(server):
    assert server.respond("HEAD", "/readyz") == server.respond("GET", "/readyz")


# ------------------------------------------------------------------ a real server on a free port


def exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, rest


async def fetch(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    return parse(await asyncio.to_thread(exchange, port, request))


@pytest.fixture
async def running(server: HttpServer):
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def test_get_over_a_socket(running, provider):
    status, headers, payload = await fetch(running.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["content-type"] == METRICS_CONTENT_TYPE
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(payload)
    assert payload == provider.metrics_body


async def test_head_sends_the_headers_of_get_and_no_body(running, provider):
    status, headers, payload = await fetch(running.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == 200
    assert int(headers["content-length"]) == len(provider.metrics_body)
    assert payload == b""


async def test_404_and_405_over_a_socket(running):
    assert (await fetch(running.port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
    status, _, payload = await fetch(running.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert status == 405
    assert json.loads(payload) == {"error": "only GET and HEAD"}


@pytest.mark.parametrize(
    "request_line",
    [b"GET /metrics\r\n\r\n", b"GET /metrics SPDY/3\r\n\r\n", b"GET  /metrics HTTP/1.1\r\n\r\n"],
)
async def test_a_malformed_request_line_is_400(running, request_line):
    status, _, payload = await fetch(running.port, request_line)
    assert status == 400
    assert json.loads(payload) == {"error": "malformed request line"}


async def test_a_request_head_larger_than_the_limit_is_431(running, provider):
    filler = b"X-Filler: " + b"a" * (MAX_REQUEST_BYTES + 1024) + b"\r\n"
    status, _, payload = await fetch(running.port, b"GET /metrics HTTP/1.1\r\n" + filler + b"\r\n")
    assert status == 431
    assert json.loads(payload) == {"error": "request head too large"}
    # and the server still answers the next client
    assert (await fetch(running.port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200


async def test_a_handler_error_is_a_500_without_details(running, provider):
    provider.fail_with = RuntimeError("secret detail nats://user:pw@host")
    status, _, payload = await fetch(running.port, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert status == 500
    assert json.loads(payload) == {"error": "internal error"}


async def test_a_silent_client_does_not_block_the_others(running):
    idle = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(3)]
    half = socket.create_connection(("127.0.0.1", running.port))
    half.sendall(b"GET /metrics HTTP/1.1\r\nHost:")  # a head that never ends
    try:
        started = time.monotonic()
        status, _, _ = await fetch(running.port, b"GET /healthz HTTP/1.1\r\n\r\n")
        elapsed = time.monotonic() - started
        assert status == 200
        assert elapsed < 1.0, f"a request waited {elapsed:.2f}s behind silent clients"
    finally:
        for sock in (*idle, half):
            sock.close()


async def test_a_silent_client_is_dropped_after_the_read_timeout(running, monkeypatch):
    monkeypatch.setattr(http, "READ_TIMEOUT", 0.2)
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
        started = time.monotonic()
        assert await asyncio.to_thread(sock.recv, 1) == b""  # closed by the server, no answer
        assert time.monotonic() - started < 3


# ------------------------------------------------------------------ HttpThread: its own loop


def test_http_thread_serves_while_the_callers_loop_is_blocked(provider):
    """The point of the thread: a busy forwarding loop must not delay an answer."""

    async def scenario() -> float:
        thread = HttpThread(HttpServer("127.0.0.1", 0, provider))
        await thread.start()
        try:
            answered: list[float] = []

            def client() -> None:
                started = time.monotonic()
                status, _, _ = parse(exchange(thread.port, b"GET /readyz HTTP/1.1\r\n\r\n"))
                assert status == 200
                answered.append(time.monotonic() - started)

            worker = threading.Thread(target=client)
            worker.start()
            time.sleep(1.0)  # noqa: ASYNC251 - blocks this loop on purpose, like a long forwarding turn
            worker.join(5)
            assert answered, "no answer while the service's loop was blocked"
            return answered[0]
        finally:
            await thread.close()

    elapsed = asyncio.run(scenario())
    assert elapsed < 0.5


async def test_http_thread_reports_a_busy_port_and_leaves_no_thread(provider):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        thread = HttpThread(HttpServer("127.0.0.1", port, provider))
        with pytest.raises(OSError, match="ddress already in use"):
            await thread.start()
        await thread.close()
        assert thread._thread is not None
        assert not thread._thread.is_alive()


async def test_http_thread_close_stops_listening_and_joins(provider):
    thread = HttpThread(HttpServer("127.0.0.1", 0, provider))
    await thread.start()
    port = thread.port
    assert port != 0
    assert (await fetch(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200
    await thread.close()
    assert thread._thread is not None
    assert not thread._thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    await thread.close()  # idempotent


# ------------------------------------------------------------------ the service's liveness


@pytest.fixture
def service(tmp_path):
    from forwarder.config import load_config
    from forwarder.service import Server
    from tests.integration.harness import write_config

    return Server(
        load_config(write_config(tmp_path / "f.yaml", "nats://127.0.0.1:1", {"C1": "nats://c1:4222"}))
    )


def test_service_liveness_turns_503_when_its_event_loop_stops_turning(service):
    from forwarder.service import LOOP_STALL_SECONDS

    server = HttpServer("127.0.0.1", 0, service)
    assert server.respond("GET", "/healthz")[0] == 200
    service.loop_heartbeat -= LOOP_STALL_SECONDS + 1
    status, _, payload = server.respond("GET", "/healthz")
    assert status == 503
    doc = json.loads(payload)
    assert doc["status"] == "stalled"
    assert doc["event_loop_silent_seconds"] > LOOP_STALL_SECONDS


async def test_service_heartbeat_keeps_liveness_fresh(service, monkeypatch):
    from forwarder import service as service_module

    monkeypatch.setattr(service_module, "HEARTBEAT_INTERVAL", 0.01)
    service.loop_heartbeat = 0.0
    task = asyncio.get_running_loop().create_task(service._heartbeat())
    try:
        await async_wait_until(lambda: service.loop_heartbeat > 0.0, 5, message="no first heartbeat")
        assert service.liveness()[0]
        first = service.loop_heartbeat
        await async_wait_until(lambda: service.loop_heartbeat > first, 5, message="no second heartbeat")
        assert time.monotonic() - service.loop_heartbeat < 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_service_route_answers_from_the_ring_without_filling_the_hot_path_cache(service):
    answer = service.route("pump-7")
    assert answer == {
        "asset": "pump-7",
        "cluster": "C1",
        "servers": ["nats://c1:4222"],
        "topology_version": 1,
    }
    assert service.router._cluster_of.entries() == 0  # the HTTP thread never writes to it
