"""Fixtures that run real nats-server processes (forwarder.embedded) and always stop them again.

Every server gets fresh loopback ports and a directory under the test's ``tmp_path``, so the suite
also runs under pytest-xdist. Teardown stops everything a test started, whether it passed or not,
and then asserts by pid that none of those processes is still alive.

Note: the factory fixture is called ``nats``, which shadows the nats-py module inside a test that
takes it as an argument; such a test can import ``nats as nats_py`` or take ``nats_servers``
(the same object).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forwarder.embedded import LocalCluster, LocalServer, pid_alive, start_cluster, start_server, stop_all
from tests.integration.harness import ForwarderProcess


class NatsFactory:
    """Starts servers and clusters for one test; ``close()`` (run at teardown) stops every one."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[LocalServer | LocalCluster] = []
        self._seq = itertools.count(1)

    def server(
        self,
        *,
        name: str | None = None,
        jetstream: bool = False,
        max_payload: int | None = None,
        extra_config: str = "",
        port: int | None = None,
        http_port: int | None = None,
        timeout: float = 10,
    ) -> LocalServer:
        server = start_server(
            self.workdir,
            name=name or f"s{next(self._seq)}",
            jetstream=jetstream,
            max_payload=max_payload,
            extra_config=extra_config,
            port=port,
            http_port=http_port,
            timeout=timeout,
        )
        self.started.append(server)
        return server

    def cluster(
        self,
        *,
        name: str | None = None,
        size: int = 3,
        jetstream: bool = False,
        max_payload: int | None = None,
        extra_config: str = "",
        timeout: float = 20,
    ) -> LocalCluster:
        cluster = start_cluster(
            self.workdir,
            name=name or f"c{next(self._seq)}",
            size=size,
            jetstream=jetstream,
            max_payload=max_payload,
            extra_config=extra_config,
            timeout=timeout,
        )
        self.started.append(cluster)
        return cluster

    @property
    def pids(self) -> list[int]:
        """Every process started through this factory, restarts included."""
        return [pid for s in self.started for pid in s.pids]

    def close(self) -> None:
        try:
            stop_all(self.started)
        finally:
            alive = [pid for pid in self.pids if pid_alive(pid)]
            assert not alive, f"nats-server processes still alive after teardown: {alive}"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Config files, logs and JetStream stores of this test's servers."""
    path = tmp_path / "nats"
    path.mkdir()
    return path


@pytest.fixture
def nats_servers(workdir: Path) -> Iterator[NatsFactory]:
    factory = NatsFactory(workdir)
    try:
        yield factory
    finally:  # also when the test, or a fixture built on this one, failed
        factory.close()


@pytest.fixture
def nats(nats_servers: NatsFactory) -> NatsFactory:
    """``nats.server(**kw)`` / ``nats.cluster(**kw)``; all stopped at teardown."""
    return nats_servers


@pytest.fixture
def source_server(nats_servers: NatsFactory) -> LocalServer:
    """A single JetStream-enabled node, as the forwarder's source."""
    return nats_servers.server(name="source", jetstream=True)


@pytest.fixture
def target_server(nats_servers: NatsFactory) -> LocalServer:
    """A single core-NATS node, as one target cluster."""
    return nats_servers.server(name="target")


@pytest.fixture
def target_cluster3(nats_servers: NatsFactory) -> LocalCluster:
    """A real 3-node core-NATS cluster (nodes target3-1..3), as one target cluster."""
    return nats_servers.cluster(name="target3", size=3)


@pytest.fixture
def forwarder(tmp_path: Path) -> Iterator[Callable[..., ForwarderProcess]]:
    """``forwarder(config, env=..., name=...)`` starts ``forwarder run``; every process is
    stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list[ForwarderProcess] = []

    def start(config: Path, *, env: dict[str, str] | None = None, name: str = "fwd") -> ForwarderProcess:
        proc = ForwarderProcess(config, tmp_path / f"{name}.log", env=env or {}).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
