"""Driving a real forwarder process against real nats-server processes.

``ForwarderProcess`` runs ``python -m forwarder run -c FILE`` as a child process (so
signals, exit codes and crashes are the real ones) and talks to it over its HTTP
port. ``TargetCollector`` records what arrives on each target cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import yaml
from nats.aio.client import Client
from nats.aio.msg import Msg

from forwarder.embedded import free_port
from tests.helpers import async_wait_until, wait_until


def write_config(
    path: Path, source_url: str | list[str], clusters: Mapping[str, Any], **sections: Any
) -> Path:
    """A forwarder config: ``clusters`` maps a name to URLs (str or list) or to a full mapping.

    ``sections`` (source=..., routing=...) are merged into the defaults, one level deep.
    """
    servers = [source_url] if isinstance(source_url, str) else list(source_url)
    doc: dict[str, Any] = {
        "source": {"servers": servers, "subject": "assets.>"},
        "routing": {"key": {"subject_token": 1}},
        "clusters": {
            name: (spec if isinstance(spec, dict) else {"servers": [spec] if isinstance(spec, str) else spec})
            for name, spec in clusters.items()
        },
        "http": {"host": "127.0.0.1", "port": free_port()},
        "log": {"level": "debug", "format": "json"},
        "shutdown_timeout": 10,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels as printed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@dataclass
class ForwarderProcess:
    """One ``forwarder run`` child process."""

    config: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    args: list[str] = field(default_factory=list)  # more options for ``forwarder run``

    @property
    def port(self) -> int:
        return int(yaml.safe_load(self.config.read_text())["http"]["port"])

    def start(self) -> ForwarderProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forwarder", "run", "-c", str(self.config), *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        log.close()
        return self

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, path: str) -> Any:
        return json.loads(self.get(path)[1])

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.get("/metrics")[1].decode())

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def ready(self) -> bool:
        try:
            return self.get("/readyz", timeout=1)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 20) -> ForwarderProcess:
        wait_until(
            lambda: self.exited or self.ready(),
            timeout,
            message=lambda: f"forwarder not ready\n{self.log_tail()}",
        )
        assert not self.exited, f"forwarder exited with {self.returncode}\n{self.log_tail()}"
        return self

    @property
    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit. Always reaps the process."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events


class TargetCollector:
    """Subscribes to ``subject`` on each target cluster and records what arrives where."""

    def __init__(self) -> None:
        self.received: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        self._conns: list[Client] = []

    async def watch(self, name: str, servers: Iterable[str], subject: str = "assets.>") -> None:
        async def on_msg(msg: Msg) -> None:
            self.received[name].append((msg.subject, msg.data))

        nc = await nats.connect(list(servers), name=f"test-collector-{name}", max_reconnect_attempts=-1,
                                reconnect_time_wait=0.2)  # fmt: skip
        await nc.subscribe(subject, cb=on_msg, pending_msgs_limit=2_000_000, pending_bytes_limit=1 << 30)
        await nc.flush()
        self._conns.append(nc)

    def count(self) -> int:
        return sum(len(v) for v in self.received.values())

    async def wait_count(self, n: int, timeout: float = 20) -> None:
        await async_wait_until(lambda: self.count() >= n, timeout, message=f"collected {self.count()} of {n}")

    async def close(self) -> None:
        for nc in self._conns:
            await nc.close()


def asset_name(i: int, assets: int) -> str:
    return f"asset-{i % assets:05d}"


async def publish_assets(
    url: str, count: int, assets: int, *, start: int = 0, prefix: str = "assets"
) -> list[str]:
    """Publish messages ``start..start+count`` over ``assets`` assets on core NATS.

    Message ``i`` goes to ``PREFIX.asset-<i % assets>.value`` with the payload ``m<i>``,
    a unique id whose number also gives the per-asset order.
    """
    nc = await nats.connect(url)
    ids = []
    for i in range(start, start + count):
        msg_id = f"m{i:07d}"
        await nc.publish(f"{prefix}.{asset_name(i, assets)}.value", msg_id.encode())
        ids.append(msg_id)
    await nc.flush()
    await nc.close()
    return ids


def asset_of(subject: str) -> str:
    return subject.split(".")[1]
