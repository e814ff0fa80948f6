"""Generators for the security tests: TLS certificates, NKeys, the JWT chain of NATS
decentralized auth, server config blocks, and a raw NATS protocol client.

Everything is generated in the test, in memory or under its ``tmp_path``: no fixture
files, no network, no tool besides the ``cryptography`` and ``nkeys`` packages.

``RawPublisher`` / ``RawSubscriber`` speak the NATS protocol on a plain socket, without
nats-py: they send bytes that nats-py would refuse to build (a subject that is not UTF-8,
a malformed header block) and they see exactly what the server delivers, so they can be
the independent witness of what was received, forwarded and dead-lettered.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# --------------------------------------------------------------------------- TLS


@dataclass
class Pem:
    """A certificate and its private key, as PEM files on disk."""

    cert: Path
    key: Path

    @property
    def key_text(self) -> str:
        return self.key.read_text()

    def key_body_lines(self) -> list[str]:
        """The base64 lines of the private key: a leak of any of them is a leak."""
        return [line for line in self.key_text.splitlines() if line and not line.startswith("-----")]


@dataclass
class CertAuthority:
    """A throwaway CA that issues server and client certificates."""

    name: str
    directory: Path
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert: x509.Certificate = field(repr=False)

    @classmethod
    def create(cls, directory: Path, name: str = "test-ca") -> CertAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(name, directory, key, cert)
        ca.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return ca

    @property
    def ca_file(self) -> Path:
        return self.directory / f"{self.name}.pem"

    def issue(self, name: str, *, hosts: Iterable[str] = (), client: bool = False) -> Pem:
        """A leaf certificate for ``hosts`` (DNS names or IP addresses); ``client``: for mTLS."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        pem = Pem(self.directory / f"{name}.pem", self.directory / f"{name}-key.pem")
        pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        pem.key.chmod(0o600)
        return pem


def server_tls_config(server: Pem, *, ca: Path | None = None, verify_clients: bool = False) -> str:
    """A nats-server ``tls {}`` block; ``verify_clients``: mutual TLS (clients need a cert from ``ca``)."""
    lines = [f'cert_file: "{server.cert}"', f'key_file: "{server.key}"', "timeout: 2"]
    if ca is not None:
        lines.append(f'ca_file: "{ca}"')
    if verify_clients:
        lines.append("verify: true")
    return "tls {\n  " + "\n  ".join(lines) + "\n}"


# --------------------------------------------------------------------------- NKeys and JWTs


@dataclass(frozen=True)
class NKey:
    seed: str = field(repr=False)
    public: str

    @classmethod
    def create(cls, prefix: int) -> NKey:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        kp = nkeys.from_seed(bytearray(seed))
        return cls(seed.decode(), kp.public_key.decode())

    def sign(self, data: bytes) -> bytes:
        kp = nkeys.from_seed(bytearray(self.seed.encode()))
        try:
            return bytes(kp.sign(data))
        finally:
            kp.wipe()


def user_nkey() -> NKey:
    return NKey.create(nkeys.PREFIX_BYTE_USER)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(claims: Mapping[str, Any], issuer: NKey) -> str:
    """A NATS JWT: ``{"typ":"JWT","alg":"ed25519-nkey"}``, claims signed by the issuer's nkey.

    ``jti`` is the base32 SHA-512/256 of the claims without it, as the Go library does.
    """
    body = {"iat": int(time.time()), **claims, "iss": issuer.public}
    body.pop("jti", None)
    digest = hashlib.new("sha512_256", json.dumps(body, separators=(",", ":")).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(body, separators=(",", ":")).encode())
    signature = _b64url(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


UNLIMITED_ACCOUNT = {
    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
    "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
}  # fmt: skip


@dataclass
class OperatorChain:
    """Operator -> account -> user, for a server in operator mode with a MEMORY resolver."""

    operator: NKey
    account: NKey
    operator_jwt: str
    account_jwt: str

    @classmethod
    def create(cls, name: str = "test") -> OperatorChain:
        operator = NKey.create(nkeys.PREFIX_BYTE_OPERATOR)
        account = NKey.create(nkeys.PREFIX_BYTE_ACCOUNT)
        operator_jwt = encode_jwt(
            {"name": f"{name}-operator", "sub": operator.public, "nats": {"type": "operator", "version": 2}},
            operator,
        )
        account_jwt = encode_jwt(
            {
                "name": f"{name}-account",
                "sub": account.public,
                "nats": {
                    "limits": UNLIMITED_ACCOUNT,
                    "default_permissions": {"pub": {}, "sub": {}},
                    "type": "account",
                    "version": 2,
                },
            },
            operator,
        )
        return cls(operator, account, operator_jwt, account_jwt)

    def user(self, name: str = "forwarder", *, expires_in: float | None = None) -> tuple[str, NKey]:
        """A user JWT signed by the account, and the user's nkey (its seed goes in the creds file)."""
        user = user_nkey()
        claims: dict[str, Any] = {
            "name": name,
            "sub": user.public,
            "nats": {
                "pub": {},
                "sub": {},
                "subs": -1,
                "data": -1,
                "payload": -1,
                "type": "user",
                "version": 2,
            },
        }
        if expires_in is not None:
            claims["exp"] = int(time.time() + expires_in)
        return encode_jwt(claims, self.account), user

    def server_config(self) -> str:
        """nats-server config lines: operator mode, the account preloaded in a MEMORY resolver."""
        return (
            f"operator: {self.operator_jwt}\n"
            "resolver: MEMORY\n"
            f"resolver_preload: {{\n  {self.account.public}: {self.account_jwt}\n}}"
        )


def creds_text(user_jwt: str, seed: str) -> str:
    """A ``.creds`` file as ``nsc`` writes it."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def write_secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------- server auth blocks


def user_password_config(user: str, password: str) -> str:
    return f'authorization {{ user: "{user}", password: "{password}" }}'


def token_config(token: str) -> str:
    return f'authorization {{ token: "{token}" }}'


def nkey_config(public: str) -> str:
    return f"authorization {{ users: [ {{ nkey: {public} }} ] }}"


# --------------------------------------------------------------------------- raw NATS protocol

CONNECT = b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":false,"protocol":1}\r\n'


def hpub(subject: bytes, header_block: bytes, payload: bytes, reply: bytes = b"") -> bytes:
    """An ``HPUB`` command with any header block, sizes computed."""
    mid = b" " + reply if reply else b""
    return b"HPUB %b%b %d %d\r\n%b%b\r\n" % (
        subject, mid, len(header_block), len(header_block) + len(payload), header_block, payload,
    )  # fmt: skip


def pub(subject: bytes, payload: bytes) -> bytes:
    return b"PUB %b %d\r\n%b\r\n" % (subject, len(payload), payload)


def header_block(headers: Iterable[tuple[str | bytes, str | bytes]], status: bytes = b"") -> bytes:
    """``NATS/1.0[ status]\\r\\nName: value\\r\\n...\\r\\n`` from (name, value) pairs (duplicates kept)."""

    def b(v: str | bytes) -> bytes:
        return v if isinstance(v, bytes) else v.encode()

    lines = [b"NATS/1.0" + (b" " + status if status else b"")]
    lines += [b(k) + b": " + b(v) for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class RawPublisher:
    """A blocking socket that publishes raw protocol; ``flush()`` is a PING/PONG round trip."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self._buf = b""
        self._read_line()  # INFO
        self.sock.sendall(CONNECT)
        self.errors: list[bytes] = []

    def _read_line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def flush(self) -> None:
        """Every byte sent so far was processed by the server; a -ERR is raised."""
        self.sock.sendall(b"PING\r\n")
        while True:
            line = self._read_line()
            if line == b"PONG":
                break
            if line.startswith(b"-ERR"):
                self.errors.append(line)
                raise ConnectionError(f"server said {line!r}")
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")

    def close(self) -> None:
        self.sock.close()


@dataclass
class RawMessage:
    subject: bytes
    reply: bytes
    header_block: bytes | None
    payload: bytes

    def headers(self) -> list[tuple[str, str]]:
        """The header lines as (name, value), in order, duplicates kept; undecodable bytes escaped."""
        if not self.header_block:
            return []
        out = []
        for line in self.header_block.split(b"\r\n")[1:]:
            if b":" in line:
                name, _, value = line.partition(b":")
                out.append(
                    (
                        name.decode("ascii", "backslashreplace"),
                        value.strip().decode("utf-8", "backslashreplace"),
                    )
                )
        return out

    def header(self, name: str) -> str | None:
        found = [v for k, v in self.headers() if k.lower() == name.lower()]
        return found[-1] if found else None


class RawSubscriber:
    """Subscribes with a raw socket and records every message exactly as the server sent it.

    A thread reads; ``messages`` grows as they arrive. It is the test's own witness: it does
    not share nats-py's parser, so a message nats-py cannot handle is still counted here.
    """

    def __init__(
        self,
        port: int,
        subjects: Iterable[str],
        host: str = "127.0.0.1",
        key: Callable[[bytes], bytes] = lambda subject: subject.split(b".", 1)[0],
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.messages: list[RawMessage] = []
        self._key = key  # messages are also counted by key(subject), and the last one kept
        self.counts: dict[bytes, int] = {}
        self.last: dict[bytes, RawMessage] = {}
        self._lock = threading.Lock()
        self._pong = threading.Event()
        self._closed = False
        self._buf = bytearray()
        while b"\r\n" not in self._buf:
            self._buf += self.sock.recv(65536)
        del self._buf[: self._buf.index(b"\r\n") + 2]  # INFO
        self.sock.settimeout(None)
        subs = b"".join(b"SUB %b %d\r\n" % (s.encode(), i) for i, s in enumerate(subjects, 1))
        self._thread = threading.Thread(target=self._run, daemon=True, name="raw-subscriber")
        self._thread.start()
        self.sock.sendall(CONNECT + subs)
        self.flush()

    def flush(self, timeout: float = 10) -> None:
        """Round trip: the subscriptions are active on the server after this."""
        self._pong.clear()
        self.sock.sendall(b"PING\r\n")
        if not self._pong.wait(timeout):
            raise TimeoutError("no PONG from the server")

    def _run(self) -> None:
        try:
            while not self._closed:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return
                self._buf += chunk
                self._parse()
        except OSError:
            return

    def _parse(self) -> None:
        buf = self._buf
        while True:
            end = buf.find(b"\r\n")
            if end < 0:
                return
            line = bytes(buf[:end])
            if line.startswith((b"MSG ", b"HMSG ")):
                parts = line.split(b" ")
                if parts[0] == b"MSG":
                    subject, reply = parts[1], (parts[3] if len(parts) == 5 else b"")
                    hsize, total = 0, int(parts[-1])
                else:
                    subject, reply = parts[1], (parts[3] if len(parts) == 6 else b"")
                    hsize, total = int(parts[-2]), int(parts[-1])
                if len(buf) < end + 2 + total + 2:
                    return
                body = bytes(buf[end + 2 : end + 2 + total])
                del buf[: end + 2 + total + 2]
                msg = RawMessage(subject, reply, body[:hsize] if parts[0] == b"HMSG" else None, body[hsize:])
                key = self._key(subject)
                with self._lock:
                    self.messages.append(msg)
                    self.counts[key] = self.counts.get(key, 0) + 1
                    self.last[key] = msg
                continue
            del buf[: end + 2]
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")
            elif line == b"PONG":
                self._pong.set()

    def count_key(self, key: bytes) -> int:
        with self._lock:
            return self.counts.get(key, 0)

    def last_of(self, key: bytes) -> RawMessage | None:
        with self._lock:
            return self.last.get(key)

    def count(self, predicate: Callable[[RawMessage], bool] | None = None) -> int:
        with self._lock:
            return len(self.messages) if predicate is None else sum(1 for m in self.messages if predicate(m))

    def snapshot(self) -> list[RawMessage]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


# --------------------------------------------------------------------------- servers


def reload_server(server: Any, extra_config: str) -> None:
    """Rewrite a running ``LocalServer``'s config with new ``extra_config`` and SIGHUP it (a reload)."""
    import signal

    server.extra_config = extra_config
    server.config_path.write_text(server.config_text())
    assert server.pid is not None
    assert server.running
    os.kill(server.pid, signal.SIGHUP)


def server_log_count(server: Any, *needles: str) -> int:
    """Lines of the server's log that contain any of ``needles`` (case-insensitive)."""
    text = server.log_path.read_text(errors="replace").lower() if server.log_path.exists() else ""
    return sum(1 for line in text.splitlines() if any(n.lower() in line for n in needles))


def tls_url(server: Any, host: str = "127.0.0.1") -> str:
    return f"tls://{host}:{server.port}"


async def prove_subscribed(nc: Any, subject: str, seen: Callable[[], bool], timeout: float = 10) -> None:
    """Publish an echoed probe on ``subject`` from the subscribing connection until ``seen()``.

    nats-py's ``flush()`` can overtake a SUB still in its buffer; a probe published on the same
    connection goes out after the SUB, so its arrival proves the server has the interest.
    """
    import asyncio

    deadline = time.monotonic() + timeout
    while not seen():
        if time.monotonic() > deadline:
            raise AssertionError(f"the subscription to {subject} never became active")
        await nc.publish(subject, b"probe")
        await nc.flush()
        await asyncio.sleep(0.02)
