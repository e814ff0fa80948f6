"""Messages built to break the forwarder, through live forwarders on real servers.

Three forwarders share one source and two target clusters, one per key mode: the subject
token (``tok.>``), a header (``hdr.>``, target subject ``out.{asset}``) and a JSON field
(``json.>``, parsed up to 2048 bytes). The source takes 64 KiB messages, C1 32 KiB, C2 8 KiB.

Hostile messages are sent as raw protocol bytes (nats-py would refuse to build most of them)
and watched by raw-socket subscribers that share nothing with nats-py: on the source subjects
(what was *received*), on the dead-letter subjects and on every target. Each message must
either arrive at the target the ring names, unchanged, or arrive on the dead-letter subject
with the precise ``Forwarder-Error`` an independent oracle predicts; after every message
received == forwarded + dead-lettered, exactly, in the witnesses' counts and in the
forwarder's metrics, and the source connection never stalls. Property tests (hypothesis)
explore; fixed cases pin each documented behaviour.
"""

from __future__ import annotations

import json
import random
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from forwarder.config import load_config
from forwarder.embedded import LocalServer, pid_alive, start_server, stop_all
from forwarder.hashring import Ring, build_ring
from tests.helpers import wait_until
from tests.integration.harness import ForwarderProcess, write_config
from tests.security_helpers import RawMessage, RawPublisher, RawSubscriber, header_block, hpub, pub

pytestmark = pytest.mark.integration

SOURCE_MAX = 65536
MAX_PAYLOAD = {"C1": 32768, "C2": 8192}
MAX_JSON = 2048
MAX_KEY = 1024
MALFORMED_NAME = "(malformed header block)"


@dataclass(frozen=True)
class Mode:
    name: str
    routing: dict[str, Any]

    @property
    def prefix(self) -> bytes:
        return self.name.encode() + b"."

    @property
    def dead(self) -> str:
        return f"dead.{self.name}"

    @property
    def key(self) -> bytes:
        """The first token of the source subjects, and of the target subjects this mode produces."""
        return self.name.encode()

    @property
    def forwarded_key(self) -> bytes:
        return b"out" if self.name == "hdr" else self.key


MODES = {
    "tok": Mode("tok", {"key": {"subject_token": 1}, "subject": "{subject}"}),
    "hdr": Mode("hdr", {"key": {"header": "Asset-Id"}, "subject": "out.{asset}"}),
    "json": Mode(
        "json", {"key": {"json_field": "asset_uuid", "max_json_bytes": MAX_JSON}, "subject": "{subject}"}
    ),
}


# --------------------------------------------------------------------------- the oracle


@dataclass
class Expected:
    """What must become of one message."""

    reasons: set[str] = field(default_factory=set)  # dead-lettered with one of these; empty: forwarded
    detail: str | None = None  # the exact Forwarder-Error detail, where the oracle knows it
    cluster: str | None = None
    subject: bytes | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def forwarded(self) -> bool:
        return not self.reasons


def dead(reason: str, detail: str | None = None, *alternatives: str) -> Expected:
    return Expected(reasons={reason, *alternatives}, detail=detail)


@dataclass
class Block:
    """A header block as the forwarder's contract reads it (independently of nats-py)."""

    malformed: bool
    headers: list[tuple[str, str]] = field(default_factory=list)  # names and values as forwarded, in order
    parsed: list[tuple[str, str]] = field(default_factory=list)  # as nats-py holds them (sizes count these)


def read_block(block: bytes | None) -> Block:
    if block is None:
        return Block(False)
    if not block.startswith(b"NATS/1.0\r\n"):
        return Block(True)  # no version line, or a status line from a producer
    parts = block.split(b"\r\n")
    if len(parts) < 3 or parts[-2:] != [b"", b""]:
        return Block(True)
    headers: list[tuple[str, str]] = []
    parsed: list[tuple[str, str]] = []
    for line in parts[1:-2]:
        name, colon, value = line.partition(b":")
        try:
            text_name = name.strip().decode("ascii")
            text_value = value.strip().decode("utf-8")
        except UnicodeDecodeError:
            return Block(True)
        if b"\r" in line or b"\n" in line or not colon or not text_name:
            return Block(True)
        if any(c.isspace() for c in text_name) or text_name in dict(headers):
            return Block(True)
        headers.append((text_name, text_value.strip()))  # NATS clients trim values
        parsed.append((text_name, text_value))
    return Block(False, headers, parsed)


def nesting(payload: bytes) -> int:
    """The deepest bracket nesting in ``payload`` (strings not excluded: an upper bound)."""
    depth = deepest = 0
    for byte in payload:
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


TOKEN_CHARS = set("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)


def is_token(name: str) -> bool:
    return bool(name) and set(name) <= TOKEN_CHARS


def utf8_clean(text: str) -> bool:
    if "\ufffd" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def subject_problem(subject: str) -> str | None:
    if not subject:
        return "no tokens"
    tokens = subject.split(".")
    if any(not t for t in tokens):
        return "an empty token"
    if any(t in ("*", ">") for t in tokens):
        return "a wildcard token"
    if any(c <= " " or c == "\x7f" for c in subject):
        return "whitespace or a control character"
    if not utf8_clean(subject):
        return "bytes that are not UTF-8"
    return None


def block_size(headers: list[tuple[str, str]]) -> int:
    return (
        12 + sum(len(k) + len(v.encode("utf-8", "surrogateescape")) + 4 for k, v in headers) if headers else 0
    )


def expect(mode: Mode, ring: Ring, subject: bytes, block: bytes | None, payload: bytes) -> Expected:
    """The fate of one message, from the documented rules alone."""
    parsed = read_block(block)
    text = subject.decode("utf-8", "surrogateescape")
    if mode.name == "tok":
        key = text.split(".")[1]
    elif mode.name == "hdr":
        if parsed.malformed:
            return dead("bad_headers")
        value = dict(parsed.headers).get("Asset-Id")
        if value is None:
            return dead("no_key_header", "no Asset-Id header")
        key = value.strip()
    else:
        if len(payload) > MAX_JSON:
            return dead("payload_too_large_to_parse", f"payload is larger than {MAX_JSON} bytes")
        if nesting(payload) > 500:  # the parser's recursion limit: where it gives up depends on the stack
            return dead("payload_not_json")
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            return dead("payload_not_json", "payload is not JSON")
        if not isinstance(doc, dict):
            return dead("payload_not_json", "payload is not a JSON object")
        if "asset_uuid" not in doc:
            return dead("no_key_field", "no asset_uuid field")
        value = doc["asset_uuid"]
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            return dead("key_not_string", f"asset_uuid is {kind}, not a string")
        key = value
    if not key:
        return dead("empty_key", "asset id is empty")
    if not utf8_clean(key):
        return dead("key_not_utf8", "asset id is not valid UTF-8")
    if len(key.encode()) > MAX_KEY:
        return dead("key_too_long", f"asset id is longer than {MAX_KEY} bytes")
    target = f"out.{key}" if mode.name == "hdr" else text
    problem = subject_problem(target)
    if problem is not None:
        return dead("bad_target_subject", f"target subject has {problem}")
    cluster = ring.cluster_for(key)
    limit = MAX_PAYLOAD[cluster]
    if parsed.malformed:
        # The forwarder carries a small stand-in header: near the limit either check may come first.
        size = len(payload) + 12 + len(MALFORMED_NAME) + 4
        if size > limit:
            return dead("too_large")
        return dead("bad_headers", None, "too_large") if size + 80 > limit else dead("bad_headers")
    if len(payload) + block_size(parsed.parsed) > limit:
        return dead("too_large")
    if not all(is_token(name) for name, _ in parsed.headers):
        return dead("bad_headers", "a header name is not a valid token")
    return Expected(cluster=cluster, subject=target.encode(), headers=parsed.headers)


# --------------------------------------------------------------------------- the live topology


@dataclass
class Topology:
    source: LocalServer
    targets: dict[str, LocalServer]
    forwarders: dict[str, ForwarderProcess]
    rings: dict[str, Ring]
    publisher: RawPublisher
    source_witness: RawSubscriber
    target_witness: dict[str, RawSubscriber]
    rates: dict[str, float] = field(default_factory=dict)
    checked: int = 0

    def received(self, mode: Mode) -> int:
        return self.source_witness.count_key(mode.key)

    def dead_count(self, mode: Mode) -> int:
        return self.source_witness.count_key(mode.dead.encode())

    def last_dead_letter(self, mode: Mode) -> RawMessage:
        letter = self.source_witness.last_of(mode.dead.encode())
        assert letter is not None
        return letter

    def forwarded(self, mode: Mode) -> dict[str, int]:
        return {name: w.count_key(mode.forwarded_key) for name, w in self.target_witness.items()}

    def outcomes(self, mode: Mode) -> int:
        return sum(self.forwarded(mode).values()) + self.dead_count(mode)

    def metrics(self, mode: Mode) -> dict[str, float]:
        return self.forwarders[mode.name].metrics()

    def send(self, mode: Mode, subject: bytes, block: bytes | None, payload: bytes) -> tuple[str, Any]:
        """Publish one raw message; ('dropped', None) | ('forwarded', (cluster, msg)) | ('dead', msg)."""
        received, outcomes = self.received(mode), self.outcomes(mode)
        forwarded_before = self.forwarded(mode)
        dead_before = self.dead_count(mode)
        self.publisher.send(hpub(subject, block, payload) if block is not None else pub(subject, payload))
        self.publisher.flush()
        self.source_witness.flush()
        if self.received(mode) == received:
            return "dropped", None  # the server did not deliver it (e.g. an empty token)
        assert self.received(mode) == received + 1
        wait_until(
            lambda: self.outcomes(mode) >= outcomes + 1,
            10,
            message=lambda: f"no outcome for {subject!r}\n{self.forwarders[mode.name].log_tail()}",
        )
        if self.dead_count(mode) > dead_before:
            return "dead", self.last_dead_letter(mode)
        after = self.forwarded(mode)
        (cluster,) = [name for name in after if after[name] > forwarded_before[name]]
        return "forwarded", (cluster, self.target_witness[cluster].last_of(mode.forwarded_key))

    def assert_counts_exact(self, mode: Mode) -> None:
        """received == forwarded + dead-lettered, in the witnesses and in the forwarder's metrics.

        Messages still on their way to a witness are waited for (with a deadline): the
        forwarder counts a message once its target connection took it, the witness a moment later.
        """
        self.source_witness.flush()
        for witness in self.target_witness.values():
            witness.flush()
        wait_until(
            lambda: (
                self.outcomes(mode) >= self.received(mode)
                and self.metrics(mode)["forwarder_messages_received_total"] >= self.received(mode)
            ),
            20,
            interval=0.05,
            message=lambda: f"{mode.name}: received {self.received(mode)}, outcomes {self.outcomes(mode)}",
        )
        metrics = self.metrics(mode)
        received = self.received(mode)
        forwarded = self.forwarded(mode)
        dead_letters = self.dead_count(mode)
        assert received == sum(forwarded.values()) + dead_letters
        assert metrics["forwarder_messages_received_total"] == received
        for name, count in forwarded.items():
            assert metrics[f'forwarder_messages_forwarded_total{{cluster="{name}"}}'] == count
        dead_metric = sum(
            v for k, v in metrics.items() if k.startswith("forwarder_messages_dead_lettered_total")
        )
        assert dead_metric == dead_letters
        assert metrics.get("forwarder_dead_letter_failures_total", 0) == 0
        assert metrics.get("forwarder_source_stalls_total", 0) == 0

    def check(self, mode: Mode, subject: bytes, block: bytes | None, payload: bytes) -> Expected | None:
        """Send one message and assert its fate against the oracle; None if the server dropped it."""
        expected = expect(mode, self.rings[mode.name], subject, block, payload)
        fate, seen = self.send(mode, subject, block, payload)
        self.checked += 1
        if fate == "dropped":
            return None
        what = f"{mode.name} {subject[:80]!r} block={block[:80] if block else None!r} payload={len(payload)}B"
        if expected.forwarded:
            assert fate == "forwarded", f"{what}: expected forwarded, got dead letter {seen.headers()}"
            cluster, msg = seen
            assert cluster == expected.cluster, what
            assert msg.subject == expected.subject, what
            assert msg.payload == payload, what
            assert msg.headers() == expected.headers, what
        else:
            assert fate == "dead", f"{what}: expected {expected.reasons}, forwarded to {seen[0]}"
            original = [(k, v) for k, v in read_block(block).parsed if is_token(k)]
            check_dead_letter(seen, subject, payload, original, expected, what)
        self.assert_counts_exact(mode)
        return expected


def check_dead_letter(
    msg: RawMessage,
    subject: bytes,
    payload: bytes,
    original: list[tuple[str, str]],
    expected: Expected,
    what: str,
) -> None:
    error = msg.header("Forwarder-Error")
    assert error is not None, what
    reason, _, detail = error.partition(": ")
    assert reason in expected.reasons, f"{what}: {error!r}, expected {expected.reasons}"
    assert detail, what
    if expected.detail is not None and len(expected.reasons) == 1:
        assert detail == expected.detail, what
    # At most 1 KiB of UTF-8 (cut at a character boundary) with a 64 KiB source max_payload.
    shown_subject = subject.decode("utf-8", "backslashreplace").encode()[:1024].decode("utf-8", "ignore")
    assert msg.header("Forwarder-Subject") == shown_subject.strip(), what
    size = len(msg.header_block or b"") + len(msg.payload)
    assert size <= SOURCE_MAX, what
    truncated = msg.header("Forwarder-Truncated")
    if truncated is None:
        assert msg.payload == payload, what
    else:
        assert int(truncated) == len(payload), what
        assert payload.startswith(msg.payload), what  # cut, or whole when dropping big headers sufficed
        # Cut only because the whole would not have fitted: the original headers, ours, the payload.
        whole = {**dict(original), "Forwarder-Error": error, "Forwarder-Subject": shown_subject}
        assert block_size(list(whole.items())) + len(payload) > SOURCE_MAX, what


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    workdir = tmp_path_factory.mktemp("hostile")
    servers: list[LocalServer] = []
    forwarders: dict[str, ForwarderProcess] = {}
    witnesses: list[RawSubscriber] = []
    publisher: RawPublisher | None = None
    try:
        source = start_server(workdir / "nats", name="source", max_payload=SOURCE_MAX)
        servers.append(source)
        targets = {
            name: start_server(workdir / "nats", name=name.lower(), max_payload=limit)
            for name, limit in MAX_PAYLOAD.items()
        }
        servers += targets.values()
        source_witness = RawSubscriber(
            source.port,
            ["tok.>", "hdr.>", "json.>", "dead.>"],
            key=lambda subject: subject if subject.startswith(b"dead.") else subject.split(b".", 1)[0],
        )
        witnesses.append(source_witness)
        target_witness = {name: RawSubscriber(t.port, [">"]) for name, t in targets.items()}
        witnesses += target_witness.values()
        rings: dict[str, Ring] = {}
        for mode in MODES.values():
            config = write_config(
                workdir / f"{mode.name}.yaml",
                source.url,
                {n: [t.url] for n, t in targets.items()},
                source={"subject": f"{mode.name}.>", "queue_group": f"q-{mode.name}"},
                routing={**mode.routing, "dead_letter_subject": mode.dead},
                log={"level": "info", "format": "json"},
            )
            settings = load_config(config)
            rings[mode.name] = build_ring(
                settings.routing.hashing.algorithm,
                {c.name: c.weight for c in settings.clusters},
                replicas=settings.routing.hashing.replicas,
            )
            forwarders[mode.name] = ForwarderProcess(config, workdir / f"{mode.name}.log").start()
        for fwd in forwarders.values():
            fwd.wait_ready()
        publisher = RawPublisher(source.port)
        topo = Topology(source, targets, forwarders, rings, publisher, source_witness, target_witness)
        topo.rates["before"] = good_message_rate(topo)
        yield topo
    finally:
        for fwd in forwarders.values():
            fwd.stop()
        if publisher is not None:
            publisher.close()
        for witness in witnesses:
            witness.close()
        stop_all(servers)
        assert not [pid for s in servers for pid in s.pids if pid_alive(pid)]


def good_message_rate(topo: Topology, count: int = 20000) -> float:
    """Messages a second the tok forwarder moves for a burst of ordinary messages (metrics-timed)."""
    mode = MODES["tok"]
    fwd = topo.forwarders["tok"]

    def forwarded() -> float:
        m = fwd.metrics()
        return sum(v for k, v in m.items() if k.startswith("forwarder_messages_forwarded_total"))

    start = forwarded()
    batch = b"".join(pub(b"tok.asset-%d.value" % (i % 500), b"x" * 128) for i in range(count))
    t0 = time.perf_counter()
    topo.publisher.send(batch)
    topo.publisher.flush()
    wait_until(lambda: forwarded() >= start + count, 30, interval=0.01)
    rate = count / (time.perf_counter() - t0)
    topo.assert_counts_exact(mode)
    return rate


# --------------------------------------------------------------------------- property tests


def rand_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


SAFE_TOKEN = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=10)
HOSTILE_TOKEN = st.one_of(
    SAFE_TOKEN.map(str.encode),
    SAFE_TOKEN.map(str.encode),
    st.sampled_from(
        [
            b"*",
            b">",
            b"",
            b"\xff",
            b"a\xc3",
            b"\xc3\xa9",
            b"\xef\xbf\xbd",
            b"a\x00b",
            b"a\x0bb",
            b"a\x0cb",
            b"\x7f",
            b"a\x1b[0m",
            b"a\x1cb",
            b"\xc2\x85",
            b"x" * 1100,
            b"a.b",
            b"..",
        ]
    ),
    st.binary(min_size=1, max_size=6).map(lambda b: b.translate(None, b" \t\r\n")).filter(bool),
)
SUBJECT_TAIL = st.lists(st.one_of(SAFE_TOKEN.map(str.encode), HOSTILE_TOKEN), min_size=0, max_size=3)

HEADER_NAME = st.one_of(
    st.sampled_from(
        ["Asset-Id", "X-Trace", "Forwarder-Error", "Content-Type", "a", "A(b)", "X Y", "é", "\x00"]
    ),
    st.text(string.ascii_letters + "-", min_size=1, max_size=12),
)
HEADER_VALUE = st.one_of(
    st.text(string.printable.strip() + " é", max_size=20),
    st.binary(max_size=12),
    st.sampled_from(
        [b"\xff", b"", b"  padded  ", b"\xef\xbf\xbd", b"a\rb", b"\x1c x \x1c", "\u00a0x".encode()]
    ),
)
WELL_FORMED = st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=4).map(header_block)
RAW_BLOCKS = st.sampled_from(
    [
        b"NATS/1.0",
        b"garbage",
        b"NATS/1.0\r\n",
        b"NATS/1.0\r\n\r\n",
        b"NATS/1.0\r\n\r\n\r\n",
        b"NATS/1.0\r\nA\r\n\r\n",
        b"NATS/1.0\r\nA: 1\r\nA: 2\r\n\r\n",
        b"NATS/1.0 503\r\n\r\n",
        b"NATS/1.0 \xff\xfe\r\n\r\n",
        b"NATS/1.0\r\n: x\r\n\r\n",
        b"NATS/1.0\r\nA: 1\r2\r\n\r\n",
        b"NATS/1.0\r\nA: 1\r\n",
        b"NATS/2.0\r\nA: 1\r\n\r\n",
        b"NATS/1.0\r\nA : 1\r\n\r\n",
    ]
)
HUGE_BLOCK = st.integers(1, 60000).map(lambda n: header_block([("X-Big", "v" * n)]))
BLOCKS = st.one_of(st.none(), st.none(), WELL_FORMED, RAW_BLOCKS, HUGE_BLOCK)
SIZES = st.one_of(
    st.integers(0, 64),
    st.sampled_from([0, 8191, 8192, 8193, 32767, 32768, 32769, 65000, SOURCE_MAX]),
    st.integers(0, SOURCE_MAX),
)
PAYLOADS = st.builds(rand_bytes, SIZES, st.integers(0, 2**31))


def fit(block: bytes | None, payload: bytes) -> bytes:
    """The payload cut so that header and payload fit the source's max_payload (else no PUB at all)."""
    return payload[: SOURCE_MAX - len(block or b"")]


PROPERTY = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@PROPERTY
@given(key=HOSTILE_TOKEN, tail=SUBJECT_TAIL, block=BLOCKS, payload=PAYLOADS)
def test_property_subject_token_mode(topology, key, tail, block, payload):
    subject = b".".join([b"tok", key, *tail])
    assume(len(subject) < 3000)  # the server's control line holds 4 KiB
    topology.check(MODES["tok"], subject, block, fit(block, payload))


ASSET_IDS = st.one_of(
    SAFE_TOKEN.map(str.encode),
    HOSTILE_TOKEN,
    st.sampled_from([b" a ", b"a b", b"a..b", b"a.", b".a", "\u00e9t\u00e9".encode(), b"x" * 1030]),
)


@PROPERTY
@given(
    asset=st.one_of(st.none(), ASSET_IDS),
    extra=st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=3),
    raw=st.one_of(st.none(), RAW_BLOCKS, HUGE_BLOCK),
    payload=PAYLOADS,
)
def test_property_header_mode(topology, asset, extra, raw, payload):
    pairs: list[tuple[str | bytes, str | bytes]] = [("Asset-Id", asset)] if asset is not None else []
    block = raw if raw is not None else header_block([*pairs, *extra])
    topology.check(MODES["hdr"], b"hdr.v", block, fit(block, payload))


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
ASSET_FIELD = st.one_of(
    ASSET_IDS.map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.sampled_from(["", "*", "a b", "\ud800", "\ufffd", "ok-1"]),
    JSON_VALUES,
)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


JSON_PAYLOADS = st.one_of(
    st.builds(
        lambda a, rest: {"asset_uuid": a, **rest},
        ASSET_FIELD,
        st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=3),
    ).map(lambda d: json.dumps(d).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
    st.sampled_from([nested(1), nested(300), nested(1015), b"1" * 5000, b'{"asset_uuid": "a", "n": 1e999}']),
    st.integers(MAX_JSON - 40, MAX_JSON + 40).map(
        lambda n: json.dumps({"asset_uuid": "big", "pad": "x" * n}).encode()
    ),
)


@PROPERTY
@given(
    payload=JSON_PAYLOADS, token=SAFE_TOKEN, block=st.one_of(st.none(), st.none(), WELL_FORMED, RAW_BLOCKS)
)
def test_property_json_field_mode(topology, payload, token, block):
    topology.check(MODES["json"], b"json." + token.encode() + b".v", block, fit(block, payload))


# --------------------------------------------------------------------------- fixed cases


def asset_on(topology: Topology, mode: str, cluster: str) -> str:
    """An asset id the ring gives to ``cluster``."""
    return next(
        a for a in (f"asset-{i}" for i in range(1000)) if topology.rings[mode].cluster_for(a) == cluster
    )


HDR = header_block


def fixed_cases(topology: Topology) -> list[tuple[str, str, bytes, bytes | None, bytes, str | None]]:
    """(label, mode, subject, header block, payload, expected Forwarder-Error or None for forwarded)."""
    c1, c2 = asset_on(topology, "tok", "C1"), asset_on(topology, "tok", "C2")
    s1, s2 = f"tok.{c1}.v".encode(), f"tok.{c2}.v".encode()
    h1 = asset_on(topology, "hdr", "C1")
    j2 = asset_on(topology, "json", "C2")
    return [
        ("empty payload", "tok", s1, None, b"", None),
        ("empty payload, json", "json", b"json.x", None, b"", "payload_not_json: payload is not JSON"),
        (
            "non-UTF-8 key token",
            "tok",
            b"tok.\xff\xfe.v",
            None,
            b"x",
            "key_not_utf8: asset id is not valid UTF-8",
        ),
        (
            "U+FFFD key token",
            "tok",
            b"tok.\xef\xbf\xbd.v",
            None,
            b"x",
            "key_not_utf8: asset id is not valid UTF-8",
        ),
        (
            "non-UTF-8 other token",
            "tok",
            s1 + b".\xff",
            None,
            b"x",
            "bad_target_subject: target subject has bytes that are not UTF-8",
        ),
        (
            "* key token",
            "tok",
            b"tok.*.v",
            None,
            b"x",
            "bad_target_subject: target subject has a wildcard token",
        ),
        (
            "> key token",
            "tok",
            b"tok.>.v",
            None,
            b"x",
            "bad_target_subject: target subject has a wildcard token",
        ),
        (
            "form feed",
            "tok",
            b"tok.a\x0cb.v",
            None,
            b"x",
            "bad_target_subject: target subject has whitespace or a control character",
        ),
        (
            "vertical tab then digits",
            "tok",
            b"tok.a.v\x0b1",
            None,
            b"x",
            "bad_target_subject: target subject has whitespace or a control character",
        ),
        (
            "NUL",
            "tok",
            b"tok.a\x00b.v",
            None,
            b"x",
            "bad_target_subject: target subject has whitespace or a control character",
        ),
        (
            "DEL and ESC",
            "tok",
            b"tok.a\x7f\x1bb.v",
            None,
            b"x",
            "bad_target_subject: target subject has whitespace or a control character",
        ),
        (
            "key of 1025 bytes",
            "tok",
            b"tok." + b"k" * 1025 + b".v",
            None,
            b"x",
            "key_too_long: asset id is longer than 1024 bytes",
        ),
        ("at C1's max_payload", "tok", s1, None, b"p" * MAX_PAYLOAD["C1"], None),
        ("one byte over C1's", "tok", s1, None, b"p" * (MAX_PAYLOAD["C1"] + 1), "too_large"),
        ("at C2's max_payload", "tok", s2, None, b"p" * MAX_PAYLOAD["C2"], None),
        ("one byte over C2's", "tok", s2, None, b"p" * (MAX_PAYLOAD["C2"] + 1), "too_large"),
        ("at the source's max_payload", "tok", s2, None, b"p" * SOURCE_MAX, "too_large"),
        (
            "headers count toward max_payload",
            "tok",
            s1,
            HDR([("X-Pad", "h" * 800)]),
            b"p" * 32000,
            "too_large",
        ),
        ("the same payload without them", "tok", s1, None, b"p" * 32000, None),
        ("huge header, dead letter cut", "tok", s1, HDR([("X-Big", "v" * 60000)]), b"p" * 5000, "too_large"),
        (
            "bare NATS/1.0",
            "tok",
            s1,
            b"NATS/1.0",
            b"x",
            "bad_headers: header block does not begin with a NATS/1.0 line",
        ),
        ("NATS/1.0 and an empty block", "tok", s1, b"NATS/1.0\r\n\r\n", b"x", None),
        (
            "status line",
            "tok",
            s1,
            b"NATS/1.0 503\r\n\r\n",
            b"",
            "bad_headers: header block has a status line",
        ),
        (
            "status line not UTF-8",
            "tok",
            s1,
            b"NATS/1.0 \xff\xfe\r\n\r\n",
            b"x",
            "bad_headers: header block has a status line",
        ),
        (
            "duplicated header",
            "tok",
            s1,
            HDR([("A", "1"), ("A", "2")]),
            b"x",
            "bad_headers: header A appears more than once",
        ),
        (
            "line without a colon",
            "tok",
            s1,
            b"NATS/1.0\r\nA: 1\r\njunk\r\n\r\n",
            b"x",
            "bad_headers: a header line is not 'Name: value'",
        ),
        (
            "bare CR in a value",
            "tok",
            s1,
            b"NATS/1.0\r\nA: 1\r2\r\n\r\n",
            b"x",
            "bad_headers: a header holds a bare CR or LF",
        ),
        (
            "value not UTF-8",
            "tok",
            s1,
            HDR([("A", b"\xff")]),
            b"x",
            "bad_headers: a header is not valid UTF-8",
        ),
        (
            "name not a token",
            "tok",
            s1,
            HDR([("A(b)", "1")]),
            b"x",
            "bad_headers: a header name is not a valid token",
        ),
        ("control characters in a value", "tok", s1, HDR([("A", "x\x00\x1by")]), b"x", None),
        ("no Asset-Id", "hdr", b"hdr.v", None, b"x", "no_key_header: no Asset-Id header"),
        ("empty Asset-Id", "hdr", b"hdr.v", HDR([("Asset-Id", "")]), b"x", "empty_key: asset id is empty"),
        (
            "Asset-Id with a space",
            "hdr",
            b"hdr.v",
            HDR([("Asset-Id", "a b")]),
            b"x",
            "bad_target_subject: target subject has whitespace or a control character",
        ),
        (
            "Asset-Id *",
            "hdr",
            b"hdr.v",
            HDR([("Asset-Id", "*")]),
            b"x",
            "bad_target_subject: target subject has a wildcard token",
        ),
        (
            "Asset-Id a..b: the template makes an empty token",
            "hdr",
            b"hdr.v",
            HDR([("Asset-Id", "a..b")]),
            b"x",
            "bad_target_subject: target subject has an empty token",
        ),
        (
            "Asset-Id not UTF-8",
            "hdr",
            b"hdr.v",
            HDR([("Asset-Id", b"\xff")]),
            b"x",
            "bad_headers: a header is not valid UTF-8",
        ),
        (
            "Asset-Id twice",
            "hdr",
            b"hdr.v",
            HDR([("Asset-Id", "a"), ("Asset-Id", "b")]),
            b"x",
            "bad_headers: header Asset-Id appears more than once",
        ),
        ("Asset-Id with dots", "hdr", b"hdr.v", HDR([("Asset-Id", "a.b")]), b"x", None),
        ("Asset-Id unicode", "hdr", b"hdr.v", HDR([("Asset-Id", "\u00e9t\u00e9")]), b"x", None),
        ("Asset-Id on C1", "hdr", b"hdr.v", HDR([("Asset-Id", h1)]), b"x", None),
        ("not JSON", "json", b"json.x", None, b"not json", "payload_not_json: payload is not JSON"),
        ("JSON list", "json", b"json.x", None, b"[1, 2]", "payload_not_json: payload is not a JSON object"),
        ("deeply nested JSON", "json", b"json.x", None, nested(1015), "payload_not_json"),
        (
            "a 5000-digit number",
            "json",
            b"json.x",
            None,
            b"1" * 5000,
            f"payload_too_large_to_parse: payload is larger than {MAX_JSON} bytes",
        ),
        (
            "JSON over max_json_bytes",
            "json",
            b"json.x",
            None,
            b'{"asset_uuid": "a", "p": "' + b"x" * MAX_JSON + b'"}',
            f"payload_too_large_to_parse: payload is larger than {MAX_JSON} bytes",
        ),
        (
            "field is a number",
            "json",
            b"json.x",
            None,
            b'{"asset_uuid": 5}',
            "key_not_string: asset_uuid is int, not a string",
        ),
        (
            "field is a list",
            "json",
            b"json.x",
            None,
            b'{"asset_uuid": ["a"]}',
            "key_not_string: asset_uuid is list, not a string",
        ),
        (
            "field is null",
            "json",
            b"json.x",
            None,
            b'{"asset_uuid": null}',
            "key_not_string: asset_uuid is null, not a string",
        ),
        ("no field", "json", b"json.x", None, b'{"other": "a"}', "no_key_field: no asset_uuid field"),
        (
            "lone surrogate",
            "json",
            b"json.x",
            None,
            b'{"asset_uuid": "\\ud800"}',
            "key_not_utf8: asset id is not valid UTF-8",
        ),
        ("good JSON", "json", b"json.x", None, json.dumps({"asset_uuid": j2}).encode(), None),
    ]


def test_fixed_hostile_cases(topology):
    for label, mode_name, subject, block, payload, error in fixed_cases(topology):
        mode = MODES[mode_name]
        expected = topology.check(mode, subject, block, payload)
        assert expected is not None, f"{label}: the server did not deliver it"
        if error is None:
            assert expected.forwarded, f"{label}: the oracle expected {expected.reasons}"
            continue
        last = topology.last_dead_letter(mode)
        shown = last.header("Forwarder-Error") or ""
        assert shown == error or (":" not in error and shown.startswith(error + ": ")), f"{label}: {shown!r}"


def test_dead_letter_too_big_for_the_source_is_cut_and_says_its_size(topology):
    mode = MODES["tok"]
    subject = f"tok.{asset_on(topology, 'tok', 'C2')}.v".encode()
    payload = rand_bytes(SOURCE_MAX, 7)
    topology.check(mode, subject, None, payload)
    letter = topology.last_dead_letter(mode)
    assert (letter.header("Forwarder-Error") or "").startswith("too_large: ")
    assert letter.header("Forwarder-Truncated") == str(SOURCE_MAX)
    assert payload.startswith(letter.payload)
    assert len(letter.header_block or b"") + len(letter.payload) <= SOURCE_MAX
    # Original headers that crowd the limit are dropped (the dead letter still says it was cut),
    # ours kept; the payload then fits whole.
    block = header_block([("X-Big", "v" * 60000), ("X-Other", "1")])
    payload = payload[: SOURCE_MAX - len(block)]
    topology.check(mode, subject, block, payload)
    letter = topology.last_dead_letter(mode)
    names = [name for name, _ in letter.headers()]
    assert names == ["Forwarder-Error", "Forwarder-Subject", "Forwarder-Truncated"]
    assert letter.payload == payload
    # Small original headers are kept and the payload is cut.
    block = header_block([("X-Other", "1")])
    payload = rand_bytes(SOURCE_MAX - len(block), 8)
    topology.check(mode, subject, block, payload)
    letter = topology.last_dead_letter(mode)
    assert letter.header("X-Other") == "1"
    assert letter.header("Forwarder-Truncated") == str(len(payload))


def test_the_server_drops_subjects_with_empty_tokens_and_splits_on_spaces(topology):
    """What producers cannot send at all: the forwarder never sees it, and counts agree."""
    mode = MODES["tok"]
    assert topology.send(mode, b"tok..v", None, b"x")[0] == "dropped"
    assert topology.send(mode, b"tok.a.", None, b"x")[0] == "dropped"
    # A space ends the subject (the rest is the reply subject): a plain, routable message.
    fate, seen = topology.send(mode, b"tok.a b.v", None, b"x")
    assert fate == "forwarded"
    assert seen[1].subject == b"tok.a"
    topology.assert_counts_exact(mode)


def test_zz_counts_stay_exact_and_good_messages_flow_at_full_speed(topology):
    for mode in MODES.values():
        topology.assert_counts_exact(mode)
    for fwd in topology.forwarders.values():
        assert not fwd.exited
        events = fwd.log_events()
        assert not [
            e
            for e in events
            if e.get("connection") == "source" and e["event"] != "subscribed" and e["event"] != "connected"
        ], "the source connection had trouble"
    after = good_message_rate(topology)
    before = topology.rates["before"]
    assert after >= 0.5 * before, f"{after:.0f} msg/s after the hostile messages, {before:.0f} before"
