"""Secret hygiene: one forwarder holding every kind of secret, driven through connect, failure,
reconnect and shutdown at debug level; not one secret appears in anything it printed or served,
nor in what ``forwarder check-config`` and ``forwarder run`` print for good and broken configs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest

from tests.helpers import async_wait_until, wait_until
from tests.integration.harness import ForwarderProcess, write_config
from tests.security_helpers import (
    CertAuthority,
    OperatorChain,
    creds_text,
    nkey_config,
    server_tls_config,
    tls_url,
    token_config,
    user_nkey,
    user_password_config,
    write_secret,
)

pytestmark = pytest.mark.integration

MARK = "SECRETMARKER"


def marker(kind: str) -> str:
    return f"{MARK}-{kind}-{uuid.uuid4().hex}"


class Secrets:
    """Every secret handed to the forwarder, by kind, to search for afterwards."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def add(self, kind: str, value: str) -> str:
        self.values[f"{kind}#{len(self.values)}"] = value
        return value

    def leaks(self, text: str) -> list[str]:
        found = [kind for kind, value in self.values.items() if value in text]
        if MARK in text:
            found.append(MARK)
        return found


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


async def test_no_secret_in_any_output_through_connect_failure_reconnect_and_shutdown(nats_servers, tmp_path):
    s = Secrets()
    files = tmp_path / "secrets"
    files.mkdir()
    env: dict[str, str] = {}

    source_pw = s.add("source password", marker("sourcepw"))
    source = nats_servers.server(name="source", extra_config=user_password_config("fwd", source_pw))
    clusters: dict[str, Any] = {}

    env_pw = s.add("password from ${VAR}", marker("envpw"))
    env["FWD_CLUSTER_PASSWORD"] = env_pw
    srv = nats_servers.server(name="cenv", extra_config=user_password_config("fwd", env_pw))
    clusters["CENV"] = {"servers": [srv.url], "auth": {"user": "fwd", "password": "${FWD_CLUSTER_PASSWORD}"}}

    file_pw = s.add("password_file content", marker("filepw"))
    srv = nats_servers.server(name="cpwfile", extra_config=user_password_config("fwd", file_pw))
    pw_file = write_secret(files / "password", file_pw + "\n")
    clusters["CPWFILE"] = {"servers": [srv.url], "auth": {"user": "fwd", "password_file": str(pw_file)}}

    token = s.add("token", marker("token"))
    token_server = nats_servers.server(name="ctoken", extra_config=token_config(token))
    clusters["CTOKEN"] = {"servers": [token_server.url], "auth": {"token": token}, "reconnect_time_wait": 0.2}

    file_token = s.add("token_file content", marker("filetoken"))
    srv = nats_servers.server(name="ctokfile", extra_config=token_config(file_token))
    clusters["CTOKFILE"] = {
        "servers": [srv.url],
        "auth": {"token_file": str(write_secret(files / "token", file_token + "\n"))},
    }

    key = user_nkey()
    s.add("nkey seed", key.seed)
    srv = nats_servers.server(name="cnkey", extra_config=nkey_config(key.public))
    clusters["CNKEY"] = {
        "servers": [srv.url],
        "auth": {"nkeys_seed": str(write_secret(files / "u.nk", key.seed))},
    }

    chain = OperatorChain.create("c")
    user_jwt, user_key = chain.user()
    s.add("credentials JWT", user_jwt)
    s.add("credentials JWT signature", user_jwt.rsplit(".", 1)[1])
    s.add("credentials seed", user_key.seed)
    creds_server = nats_servers.server(name="ccreds", extra_config=chain.server_config())
    creds = write_secret(files / "u.creds", creds_text(user_jwt, user_key.seed))
    clusters["CCREDS"] = {
        "servers": [creds_server.url], "auth": {"credentials": str(creds)}, "reconnect_time_wait": 0.2,
    }  # fmt: skip

    ca = CertAuthority.create(tmp_path / "pki")
    srv = nats_servers.server(
        name="cmtls",
        extra_config=server_tls_config(
            ca.issue("cmtls", hosts=["127.0.0.1"]), ca=ca.ca_file, verify_clients=True
        ),
    )
    client_cert = ca.issue("forwarder-client", client=True)
    for line in client_cert.key_body_lines():
        s.add("TLS private key", line)
    clusters["CMTLS"] = {
        "servers": [tls_url(srv)],
        "tls": {"ca": str(ca.ca_file), "cert": str(client_cert.cert), "key": str(client_cert.key)},
    }

    url_pw = s.add("URL userinfo", marker("urlpw"))
    srv = nats_servers.server(name="curl", extra_config=user_password_config("fwd", url_pw))
    clusters["CURL"] = {"servers": [f"nats://fwd:{url_pw}@127.0.0.1:{srv.port}"]}

    wrong = s.add("wrong password", marker("wrongpw"))
    srv = nats_servers.server(name="cwrong", extra_config=user_password_config("fwd", marker("unused")))
    clusters["CWRONG"] = {
        "servers": [srv.url], "auth": {"user": "fwd", "password": wrong}, "reconnect_time_wait": 0.3,
    }  # fmt: skip

    config = write_config(
        tmp_path / "f.yaml", source.url, clusters,
        source={"auth": {"user": "fwd", "password": source_pw}, "reconnect_time_wait": 0.2},
        routing={"key": {"header": "Asset-Id"}, "dead_letter_subject": "forwarder.dead"},
        log={"level": "debug", "format": "json"},
    )  # fmt: skip
    fwd = ForwarderProcess(config, tmp_path / "fwd.log", env=env).start()
    served: list[str] = []

    def get(path: str) -> tuple[int, str]:
        status, body = fwd.get(path)
        served.append(f"{path} {status} {body.decode(errors='replace')}")
        return status, body.decode(errors="replace")

    try:
        # Connect: everything but CWRONG; the source subscribes after the bounded start-up wait.
        def only_cwrong_down() -> bool:
            try:
                status, body = get("/readyz")
            except OSError:
                return False
            return status == 503 and set(json.loads(body)["not_ready"]) == {"CWRONG"}

        wait_until(only_cwrong_down, 30, interval=0.2, message=fwd.log_tail)
        assert "authorization violation" in json.loads(get("/readyz")[1])["not_ready"]["CWRONG"]

        # Traffic, a dead letter, and every endpoint.
        nc = await nats_py.connect(source.url, user="fwd", password=source_pw)
        for i in range(200):
            await nc.publish("assets.v", b"data", headers={"Asset-Id": f"a{i % 40}"})
        await nc.publish("assets.v", b"no Asset-Id header")  # dead-lettered
        await nc.flush()
        await async_wait_until(lambda: fwd.metric("forwarder_messages_received_total") >= 201, 10)
        for path in ("/metrics", "/route/a1", "/route/x%2Fy", "/clusters", "/readyz", "/healthz", "/nope"):
            get(path)

        # Reconnect: two servers restart (one with a token, one with JWT auth).
        token_server.restart()
        creds_server.restart()
        wait_until(
            lambda: fwd.json("/clusters")["clusters"]["CTOKEN"]["reconnects"] >= 1
            and fwd.json("/clusters")["clusters"]["CCREDS"]["reconnects"] >= 1,
            20, message=fwd.log_tail,
        )  # fmt: skip
        await nc.publish("assets.v", b"data", headers={"Asset-Id": "after"})
        await nc.flush()
        await nc.close()
        get("/clusters")
        get("/metrics")

        # Shutdown while CWRONG is still being retried.
        fwd.signal(signal.SIGTERM)
        assert fwd.wait(30) == 0
    finally:
        fwd.stop()

    output = fwd.log_text()
    events = [e["event"] for e in fwd.log_events()]
    for expected in ("connected", "connection_error", "disconnected", "reconnected", "forwarder_stopped"):
        assert expected in events, f"{expected} never happened: the run did not cover it"
    assert not s.leaks(output), f"secrets in the log: {s.leaks(output)}"
    http = "\n".join(served)
    assert not s.leaks(http), f"secrets served over HTTP: {s.leaks(http)}"
    assert "***" in http  # the URL with userinfo is shown, redacted

    result = run_cli("check-config", "-c", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert not s.leaks(result.stdout + result.stderr)


def broken_configs(tmp_path: Path, s: Secrets) -> list[tuple[str, dict[str, Any]]]:
    """Configs whose one error is about an auth key or a URL holding a secret."""
    pw = s.add("password", marker("pw"))
    token = s.add("token", marker("tok"))
    return [
        ("password and token", {"auth": {"user": "u", "password": pw, "token": token}}),
        ("password and password_file", {"auth": {"user": "u", "password": pw, "password_file": "/x"}}),
        ("password without user", {"auth": {"password": pw}}),
        ("token is a list", {"auth": {"token": [token, token]}}),
        ("token is a mapping", {"auth": {"token": {token: token}}}),
        ("misspelt key", {"auth": {"user": "u", "pasword": pw}}),
        ("unknown auth key holding a secret", {"auth": {"token": token, "secret": pw}}),
        ("malformed ${ in a password", {"auth": {"user": "u", "password": pw + "${oops"}}),
        (
            "unset variable",
            {"auth": {"user": "u", "password": "${FWD_UNSET_" + uuid.uuid4().hex[:6].upper() + "}"}},
        ),
        ("bad URL with userinfo", {"servers": [f"nats://u:{pw}@127.0.0.1:99999"]}),
        ("URL with a path and userinfo", {"servers": [f"nats://u:{pw}@127.0.0.1:4222/x"]}),
        (
            "duplicate server with userinfo",
            {"servers": [f"nats://u:{pw}@h:4222", f"nats://v:{token}@h:4222"]},
        ),
        ("password_file missing", {"auth": {"user": "u", "password_file": str(tmp_path / "absent")}}),
    ]


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_broken_auth_config_errors_name_the_key_never_the_secret(tmp_path, command):
    s = Secrets()
    for i, (what, cluster) in enumerate(broken_configs(tmp_path, s)):
        spec = {"servers": ["nats://127.0.0.1:4222"], **cluster}
        config = write_config(tmp_path / f"bad{i}.yaml", "nats://127.0.0.1:4223", {"C1": spec})
        result = run_cli(command, "-c", str(config), timeout=15)
        out = result.stdout + result.stderr
        if what == "password_file missing" and command == "check-config":
            assert result.returncode == 0, out  # check-config notes files it cannot read here
        else:
            assert result.returncode == 2, f"{what}: {out}"
            assert len(result.stderr.strip().splitlines()) == 1, f"{what}: {out}"
            assert "clusters.C1" in result.stderr, f"{what}: {out}"
        assert "Traceback" not in out, f"{what}: {out}"
        assert not s.leaks(out), f"{what}: {s.leaks(out)} in {out}"
