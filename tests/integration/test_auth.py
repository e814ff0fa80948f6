"""Every NATS auth method and TLS, on the source and on a cluster, against real servers that require it.

Each server is configured by the test to require one method (``authorization {...}``, ``tls {...}``,
operator mode with a MEMORY resolver); certificates, NKeys and the JWT chain are generated here
(tests/security_helpers.py). Then the failures: wrong credentials, untrusted or misnamed
certificates, a missing client certificate, an unusable credentials file, a JWT that expires while
connected. The forwarder must say which connection failed and why (never the secret), answer
/readyz 503 naming it, keep retrying with back-off, and connect as soon as the cause is fixed.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest

from forwarder.embedded import LocalServer
from tests.helpers import async_wait_until, wait_until
from tests.integration.harness import ForwarderProcess, write_config
from tests.security_helpers import (
    CertAuthority,
    OperatorChain,
    creds_text,
    nkey_config,
    prove_subscribed,
    reload_server,
    server_log_count,
    server_tls_config,
    tls_url,
    token_config,
    user_nkey,
    user_password_config,
    write_secret,
)

pytestmark = pytest.mark.integration

METHODS = [
    "user_password",
    "user_password_env",
    "password_file",
    "url_userinfo",
    "token",
    "token_file",
    "nkeys_seed",
    "credentials",
    "tls_ca",
    "mutual_tls",
]


@dataclass
class Secured:
    """A server that requires one auth method, and how to reach it."""

    server: LocalServer
    block: dict[str, Any]  # the forwarder's connection block: servers, auth, tls
    client: dict[str, Any]  # nats-py connect() kwargs for the test's own clients
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)


def client_tls(ca: CertAuthority, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.ca_file))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def secured(nats_servers: Any, tmp: Path, method: str, name: str, ca: CertAuthority) -> Secured:
    """Start a server named ``name`` requiring ``method``; distinct secrets per server."""
    secret = f"{method}-{name}-{uuid.uuid4().hex}"
    files = tmp / "secrets"
    files.mkdir(exist_ok=True)
    user = {"user": "fwd", "password": secret}
    if method in ("user_password", "user_password_env", "password_file", "url_userinfo"):
        server = nats_servers.server(name=name, extra_config=user_password_config("fwd", secret))
        auth: dict[str, Any] = {"user": "fwd", "password": secret}
        block: dict[str, Any] = {"servers": [server.url], "auth": auth}
        env: dict[str, str] = {}
        if method == "user_password_env":
            var = f"FWD_PASSWORD_{name.upper()}"
            auth["password"] = "${" + var + "}"
            env[var] = secret
        elif method == "password_file":
            del auth["password"]
            auth["password_file"] = str(write_secret(files / f"{name}.password", secret + "\n"))
        elif method == "url_userinfo":
            block = {"servers": [f"nats://fwd:{secret}@127.0.0.1:{server.port}"]}
        return Secured(server, block, {"servers": [server.url], **user}, env, [secret])
    if method in ("token", "token_file"):
        server = nats_servers.server(name=name, extra_config=token_config(secret))
        token_auth: dict[str, Any] = (
            {"token": secret}
            if method == "token"
            else {"token_file": str(write_secret(files / f"{name}.token", secret + "\n"))}
        )
        return Secured(
            server,
            {"servers": [server.url], "auth": token_auth},
            {"servers": [server.url], "token": secret},
            secrets=[secret],
        )
    if method == "nkeys_seed":
        key = user_nkey()
        server = nats_servers.server(name=name, extra_config=nkey_config(key.public))
        seed_file = write_secret(files / f"{name}.nk", key.seed + "\n")
        return Secured(
            server,
            {"servers": [server.url], "auth": {"nkeys_seed": str(seed_file)}},
            {"servers": [server.url], "nkeys_seed": str(seed_file)},
            secrets=[key.seed],
        )
    if method == "credentials":
        chain = OperatorChain.create(name)
        server = nats_servers.server(name=name, extra_config=chain.server_config())
        user_jwt, key = chain.user()
        creds = write_secret(files / f"{name}.creds", creds_text(user_jwt, key.seed))
        return Secured(
            server,
            {"servers": [server.url], "auth": {"credentials": str(creds)}},
            {"servers": [server.url], "user_credentials": str(creds)},
            secrets=[user_jwt, key.seed],
        )
    pem = ca.issue(f"{name}-server", hosts=["127.0.0.1", "localhost"])
    if method == "tls_ca":
        server = nats_servers.server(name=name, extra_config=server_tls_config(pem))
        return Secured(
            server,
            {"servers": [tls_url(server)], "tls": {"ca": str(ca.ca_file)}},
            {"servers": [tls_url(server)], "tls": client_tls(ca)},
        )
    assert method == "mutual_tls"
    server = nats_servers.server(
        name=name, extra_config=server_tls_config(pem, ca=ca.ca_file, verify_clients=True)
    )
    mine = ca.issue(f"{name}-client", client=True)
    return Secured(
        server,
        {
            "servers": [tls_url(server)],
            "tls": {"ca": str(ca.ca_file), "cert": str(mine.cert), "key": str(mine.key)},
        },
        {"servers": [tls_url(server)], "tls": client_tls(ca, mine.cert, mine.key)},
        secrets=mine.key_body_lines(),
    )


@pytest.fixture
def ca(tmp_path: Path) -> CertAuthority:
    return CertAuthority.create(tmp_path / "pki")


async def forward_through(src: Secured, tgt: Secured, count: int = 20) -> list[bytes]:
    """Publish ``count`` messages on the source as a test client; what the target's subscriber saw."""
    received: list[bytes] = []

    async def on_msg(msg: Any) -> None:
        if msg.subject != "assets.probe.v":
            received.append(msg.data)
        else:
            probes.append(msg.data)

    probes: list[bytes] = []
    sub_nc = await nats_py.connect(**tgt.client, connect_timeout=2)
    pub_nc = await nats_py.connect(**src.client, connect_timeout=2)
    try:
        await sub_nc.subscribe("assets.>", cb=on_msg)
        await prove_subscribed(sub_nc, "assets.probe.v", lambda: bool(probes))
        for i in range(count):
            await pub_nc.publish(f"assets.a{i}.v", f"m{i}".encode())
        await pub_nc.flush()
        await async_wait_until(lambda: len(received) >= count, 10, message=lambda: f"got {len(received)}")
    finally:
        await pub_nc.close()
        await sub_nc.close()
    return received


def not_ready(fwd: ForwarderProcess) -> dict[str, str]:
    """/readyz's ``not_ready`` body ({} while the HTTP port is not up yet, or when ready)."""
    try:
        status, body = fwd.get("/readyz", timeout=1)
    except OSError:
        return {}
    if status == 200:
        return {}
    assert status == 503, body
    return json.loads(body)["not_ready"]  # type: ignore[no-any-return]


def error_events(fwd: ForwarderProcess, **match: str) -> list[dict[str, Any]]:
    return [
        e for e in fwd.log_events()
        if e.get("level") == "error" and all(e.get(k) == v for k, v in match.items())
    ]  # fmt: skip


# --------------------------------------------------------------------------- every method works


@pytest.mark.parametrize("method", METHODS)
async def test_auth_method_on_the_source_and_a_cluster(method, nats_servers, forwarder, tmp_path, ca):
    src = secured(nats_servers, tmp_path, method, "src", ca)
    tgt = secured(nats_servers, tmp_path, method, "c1", ca)
    config = write_config(tmp_path / "f.yaml", src.block["servers"], {"C1": tgt.block}, source=src.block)
    fwd = forwarder(config, env={**src.env, **tgt.env}).wait_ready()
    received = await forward_through(src, tgt)
    assert sorted(received) == sorted(f"m{i}".encode() for i in range(20))
    clusters = fwd.json("/clusters")
    assert clusters["clusters"]["C1"]["connected"]
    assert clusters["source"]["subscribed"]
    text = fwd.log_text() + json.dumps(clusters)
    for secret in src.secrets + tgt.secrets:
        assert secret not in text


# --------------------------------------------------------------------------- failures


async def test_bad_credentials_and_certificates_name_the_cluster_and_retry_until_fixed(
    nats_servers, forwarder, tmp_path, ca
):
    """Four clusters fail four ways while C1 works; each failure is named, retried, and cured by a fix."""
    good = nats_servers.server(name="good")
    source = nats_servers.server(name="source")
    wrong_password = "wrong-" + uuid.uuid4().hex
    right_password = "right-" + uuid.uuid4().hex
    pw_server = nats_servers.server(name="pw", extra_config=user_password_config("fwd", right_password))
    other_ca = CertAuthority.create(tmp_path / "other-pki", name="other-ca")
    untrusted_pem = other_ca.issue("untrusted", hosts=["127.0.0.1"])
    untrusted = nats_servers.server(name="untrusted", extra_config=server_tls_config(untrusted_pem))
    misnamed_pem = ca.issue("misnamed", hosts=["other.example"])
    misnamed = nats_servers.server(name="misnamed", extra_config=server_tls_config(misnamed_pem))
    needs_cert_pem = ca.issue("needs-cert", hosts=["127.0.0.1"])
    needs_cert = nats_servers.server(
        name="needscert", extra_config=server_tls_config(needs_cert_pem, ca=ca.ca_file, verify_clients=True)
    )
    fast = {"reconnect_time_wait": 0.5, "connect_timeout": 1}
    clusters = {
        "C1": {"servers": [good.url]},
        "PW": {"servers": [pw_server.url], "auth": {"user": "fwd", "password": wrong_password}, **fast},
        "UNTRUSTED": {"servers": [tls_url(untrusted)], "tls": {"ca": str(ca.ca_file)}, **fast},
        "MISNAMED": {"servers": [tls_url(misnamed)], "tls": {"ca": str(ca.ca_file)}, **fast},
        "NOCERT": {"servers": [tls_url(needs_cert)], "tls": {"ca": str(ca.ca_file)}, **fast},
    }
    fwd = forwarder(write_config(tmp_path / "f.yaml", source.url, clusters))
    bad = ("PW", "UNTRUSTED", "MISNAMED", "NOCERT")

    expected = {
        "PW": "authorization violation",
        "UNTRUSTED": "certificate verify failed",
        "MISNAMED": "mismatch, certificate is not valid for",
        "NOCERT": "TLS error",
    }
    wait_until(
        lambda: all(expected[n] in not_ready(fwd).get(n, "") for n in bad), 15,
        message=lambda: f"{not_ready(fwd)}\n{fwd.log_tail()}",
    )  # fmt: skip
    assert "C1" not in not_ready(fwd)
    for name in bad:
        lines = error_events(fwd, cluster=name)
        assert lines, f"no error line for {name}\n{fwd.log_tail()}"
        assert expected[name] in lines[0]["error"]
    assert wrong_password not in fwd.log_text()
    assert wrong_password not in fwd.get("/readyz")[1].decode() + fwd.get("/clusters")[1].decode()

    # Retrying with back-off: attempts keep coming, at most one per reconnect_time_wait (0.5 s).
    # (A certificate error, too: nats-py alone stops retrying after the first one.)
    refused = {pw_server: ("authentication error", "authorization violation"), untrusted: ("tls handshake",)}
    first = {server: server_log_count(server, *needles) for server, needles in refused.items()}
    t0 = time.monotonic()
    await asyncio.sleep(3)
    elapsed = time.monotonic() - t0
    for server, needles in refused.items():
        attempts = server_log_count(server, *needles) - first[server]
        assert 2 <= attempts <= elapsed / 0.5 + 2, (server.name, attempts)

    # The good cluster is not held up by the bad ones (after the bounded start-up wait).
    collector: list[str] = []

    async def on_msg(msg: Any) -> None:
        collector.append(msg.subject)

    nc = await nats_py.connect(good.url)
    await nc.subscribe("assets.>", cb=on_msg)
    await prove_subscribed(nc, "assets.probe.v", lambda: bool(collector))
    collector.clear()
    await async_wait_until(lambda: fwd.json("/clusters")["source"]["subscribed"], 20)
    pub = await nats_py.connect(source.url)
    route = {a: fwd.json(f"/route/{a}")["cluster"] for a in (f"a{i}" for i in range(60))}
    to_c1 = [a for a, c in route.items() if c == "C1"]
    for asset in to_c1:
        await pub.publish(f"assets.{asset}.v", b"x")
    await pub.flush()
    await async_wait_until(lambda: len([s for s in collector if s != "assets.probe.v"]) >= len(to_c1), 10)
    await pub.close()
    await nc.close()

    # Fix each cause: the forwarder connects without a restart.
    reload_server(pw_server, user_password_config("fwd", wrong_password))
    reload_server(untrusted, server_tls_config(ca.issue("untrusted-fixed", hosts=["127.0.0.1"])))
    reload_server(misnamed, server_tls_config(ca.issue("misnamed-fixed", hosts=["127.0.0.1"])))
    reload_server(needs_cert, server_tls_config(needs_cert_pem))  # no longer asks for a client cert
    wait_until(fwd.ready, 20, message=lambda: f"{fwd.get('/readyz')}\n{fwd.log_tail()}")
    assert not fwd.exited


async def test_wrong_source_password_is_named_and_retried(nats_servers, forwarder, tmp_path):
    password = "src-" + uuid.uuid4().hex
    source = nats_servers.server(name="source", extra_config=user_password_config("fwd", password + "x"))
    target = nats_servers.server(name="target")
    config = write_config(
        tmp_path / "f.yaml", source.url, {"C1": [target.url]},
        source={"auth": {"user": "fwd", "password": password}, "reconnect_time_wait": 0.5},
    )  # fmt: skip
    fwd = forwarder(config)
    wait_until(
        lambda: "authorization violation" in not_ready(fwd).get("source", ""),
        15, message=fwd.log_tail,
    )  # fmt: skip
    assert fwd.get("/readyz")[0] == 503
    assert error_events(fwd, connection="source")
    reload_server(source, user_password_config("fwd", password))
    fwd.wait_ready()
    assert password not in fwd.log_text()


async def test_unusable_credentials_file_is_an_error_and_a_fixed_one_connects(
    nats_servers, forwarder, tmp_path
):
    """nats-py alone hangs its event loop on a creds file without a JWT: the forwarder must not."""
    chain = OperatorChain.create("c1")
    target = nats_servers.server(name="c1", extra_config=chain.server_config())
    source = nats_servers.server(name="source")
    user_jwt, key = chain.user()
    creds = write_secret(
        tmp_path / "c1.creds",
        "-----BEGIN USER NKEY SEED-----\n" + key.seed + "\n------END USER NKEY SEED------\n",
    )
    clusters = {
        "C1": {"servers": [target.url], "auth": {"credentials": str(creds)}, "reconnect_time_wait": 0.5}
    }
    fwd = forwarder(write_config(tmp_path / "f.yaml", source.url, clusters))
    wait_until(
        lambda: "no NATS USER JWT block" in not_ready(fwd).get("C1", ""),
        15, message=fwd.log_tail,
    )  # fmt: skip
    assert error_events(fwd, cluster="C1", event="connect_failed")
    write_secret(creds, creds_text(user_jwt, key.seed))
    fwd.wait_ready(timeout=20)
    assert key.seed not in fwd.log_text()


async def test_a_jwt_that_expires_while_connected_is_retried_until_renewed(nats_servers, forwarder, tmp_path):
    """nats-py closes a client for good on 'User Authentication Expired'; the forwarder reconnects."""
    chain = OperatorChain.create("c1")
    target = nats_servers.server(name="c1", extra_config=chain.server_config())
    source = nats_servers.server(name="source")
    user_jwt, key = chain.user(expires_in=4)
    creds = write_secret(tmp_path / "c1.creds", creds_text(user_jwt, key.seed))
    clusters = {
        "C1": {"servers": [target.url], "auth": {"credentials": str(creds)}, "reconnect_time_wait": 0.5}
    }
    fwd = forwarder(write_config(tmp_path / "f.yaml", source.url, clusters)).wait_ready()
    # C1 itself named not ready: a /readyz that merely timed out on a busy machine is not it
    wait_until(lambda: "C1" in not_ready(fwd), 15, message="the expired JWT did not disconnect C1")
    fresh_jwt, fresh_key = chain.user()
    write_secret(creds, creds_text(fresh_jwt, fresh_key.seed))
    fwd.wait_ready(timeout=20)
    assert fwd.json("/clusters")["clusters"]["C1"]["reconnects"] >= 1
    text = fwd.log_text()
    for secret in (user_jwt, key.seed, fresh_jwt, fresh_key.seed):
        assert secret not in text


async def test_a_rotated_password_file_is_used_on_reconnect(nats_servers, forwarder, tmp_path):
    """A Kubernetes Secret mounted as a file changes: the next reconnect reads the new password."""
    old, new = "old-" + uuid.uuid4().hex, "new-" + uuid.uuid4().hex
    target = nats_servers.server(name="c1", extra_config=user_password_config("fwd", old))
    source = nats_servers.server(name="source")
    password_file = write_secret(tmp_path / "password", old + "\n")
    clusters = {
        "C1": {"servers": [target.url], "auth": {"user": "fwd", "password_file": str(password_file)},
               "reconnect_time_wait": 0.3},
    }  # fmt: skip
    fwd = forwarder(write_config(tmp_path / "f.yaml", source.url, clusters)).wait_ready()
    reload_server(target, user_password_config("fwd", new))  # the server drops the old login
    wait_until(lambda: "C1" in not_ready(fwd), 15, message=fwd.log_tail)
    write_secret(password_file, new + "\n")
    fwd.wait_ready(timeout=15)
    assert fwd.json("/clusters")["clusters"]["C1"]["reconnects"] >= 1
    text = fwd.log_text()
    assert old not in text
    assert new not in text
