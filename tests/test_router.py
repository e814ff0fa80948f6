"""Unit tests for forwarder.router: key extraction, key checks, subject templates, the caches.

Pure: the router is generic over its targets, so plain strings stand in for clusters and a
counting fake stands in for the ring where a test counts lookups; the agreement test uses the
real rendezvous ring.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Mapping
from typing import Any

import pytest

from forwarder.config import KeySettings, RoutingSettings
from forwarder.hashring import RendezvousRing
from forwarder.router import (
    BAD_TARGET_SUBJECT,
    EMPTY_KEY,
    KEY_NOT_STRING,
    KEY_NOT_UTF8,
    KEY_TOO_LONG,
    MAX_KEY_BYTES,
    NO_KEY_FIELD,
    NO_KEY_HEADER,
    NO_KEY_TOKEN,
    PAYLOAD_NOT_JSON,
    PAYLOAD_TOO_LARGE_TO_PARSE,
    GraceRoute,
    Rejection,
    Router,
    compile_template,
    key_problem,
    subject_problem,
)

CLUSTERS = ("C1", "C2", "C3")
TARGETS = {name: f"target-{name}" for name in CLUSTERS}


class CountingRing:
    """A deterministic fake ring that counts its (uncached) lookups."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def cluster_for(self, asset: str) -> str:
        self.calls.append(asset)
        return self.owner(asset)

    @staticmethod
    def owner(asset: str) -> str:
        """The answer, without counting a lookup (for the tests' own checks)."""
        return CLUSTERS[sum(asset.encode("utf-8")) % len(CLUSTERS)]

    def shares(self) -> dict[str, float]:
        return dict.fromkeys(CLUSTERS, 1 / len(CLUSTERS))


def make_router(
    *,
    token: int | None = None,
    header: str | None = None,
    field: str | None = None,
    template: str = "{subject}",
    cache_size: int = 1024,
    max_json_bytes: int = 65536,
    ring: Any = None,
) -> Router[str]:
    if header is not None:
        key = KeySettings(kind="header", header=header)
    elif field is not None:
        key = KeySettings(kind="json_field", field=field, max_json_bytes=max_json_bytes)
    else:
        key = KeySettings(kind="subject_token", token=1 if token is None else token)
    routing = RoutingSettings(key=key, subject_template=template, cache_size=cache_size)
    return Router(routing, ring if ring is not None else CountingRing(), TARGETS)


def route(
    router: Router[str], subject: str, headers: Mapping[str, str] | None = None, payload: bytes = b""
) -> tuple[str, str] | Rejection:
    return router.route(subject, headers, payload)


def rejected(result: tuple[str, str] | Rejection, reason: str) -> Rejection:
    assert isinstance(result, Rejection), f"expected a {reason} rejection, got the route {result!r}"
    assert result.reason == reason, result
    return result


def routed(router: Router[str], result: tuple[str, str] | Rejection, asset: str) -> str:
    """The target subject of a successful route, after checking the target is the asset's cluster."""
    assert not isinstance(result, Rejection), f"expected a route, got {result!r}"
    target, subject = result
    ring = router.ring
    owner = ring.owner(asset) if isinstance(ring, CountingRing) else ring.cluster_for(asset)
    assert target == TARGETS[owner]
    return subject


# --------------------------------------------------------------------------- subject_token


class TestSubjectToken:
    def test_the_configured_token_is_the_key(self) -> None:
        router = make_router(token=1)
        assert routed(router, route(router, "assets.pump-7.temp"), "pump-7") == "assets.pump-7.temp"

    @pytest.mark.parametrize("index", [0, 2])
    def test_other_indexes(self, index: int) -> None:
        router = make_router(token=index)
        subject = "a0.a1.a2.a3"
        assert routed(router, route(router, subject), f"a{index}") == subject

    @pytest.mark.parametrize("subject", ["assets", "x"])
    def test_a_token_out_of_range_at_runtime_is_no_key_token(self, subject: str) -> None:
        router = make_router(token=1)
        r = rejected(route(router, subject), NO_KEY_TOKEN)
        assert r.detail == "subject has no token 1"
        assert r.header() == "no_key_token: subject has no token 1"

    def test_an_empty_token_is_an_empty_key(self) -> None:
        router = make_router(token=1)
        rejected(route(router, "assets..temp"), EMPTY_KEY)
        rejected(route(router, "assets."), EMPTY_KEY)

    def test_a_token_that_is_not_utf8_is_rejected(self) -> None:
        # The source decodes subjects with surrogateescape: b"\xff" arrives as "\udcff".
        router = make_router(token=1)
        rejected(route(router, "assets.p\udcff.temp"), KEY_NOT_UTF8)

    def test_headers_and_payload_are_ignored(self) -> None:
        router = make_router(token=1)
        result = route(router, "assets.a1.x", {"Asset-Id": "other"}, b'{"asset": "other"}')
        routed(router, result, "a1")

    def test_route_subject_is_the_cached_route_in_this_mode(self) -> None:
        router = make_router(token=1)
        assert router.route_subject is not None
        assert router.route_subject("assets.a1.x") == route(router, "assets.a1.x")
        assert router.route_subject("assets") == Rejection(NO_KEY_TOKEN, "subject has no token 1")


# --------------------------------------------------------------------------- header


class TestHeader:
    def test_the_header_value_is_the_key(self) -> None:
        router = make_router(header="Asset-Id")
        result = route(router, "data.x", {"Asset-Id": "pump-7", "Other": "y"})
        assert routed(router, result, "pump-7") == "data.x"

    def test_surrounding_whitespace_is_stripped(self) -> None:
        router = make_router(header="Asset-Id", template="out.{asset}")
        assert routed(router, route(router, "data.x", {"Asset-Id": "  pump-7\t"}), "pump-7") == "out.pump-7"

    @pytest.mark.parametrize("headers", [None, {}, {"Other": "pump-7"}, {"asset-id": "pump-7"}])
    def test_an_absent_header_is_no_key_header(self, headers: dict[str, str] | None) -> None:
        # Header names are matched exactly as configured (nats-py keeps the case it received).
        router = make_router(header="Asset-Id")
        r = rejected(route(router, "data.x", headers), NO_KEY_HEADER)
        assert r.header() == "no_key_header: no Asset-Id header"

    @pytest.mark.parametrize("value", ["", " ", "\t \t"])
    def test_an_empty_or_blank_header_is_an_empty_key(self, value: str) -> None:
        router = make_router(header="Asset-Id")
        rejected(route(router, "data.x", {"Asset-Id": value}), EMPTY_KEY)

    def test_a_value_that_was_not_utf8_is_rejected(self) -> None:
        # nats-py decodes header values with errors="replace": bad bytes arrive as U+FFFD.
        router = make_router(header="Asset-Id")
        rejected(route(router, "data.x", {"Asset-Id": "pump\ufffd7"}), KEY_NOT_UTF8)

    def test_route_subject_is_none(self) -> None:
        assert make_router(header="Asset-Id").route_subject is None


# --------------------------------------------------------------------------- json_field


def doc(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


class TestJsonField:
    def test_a_string_field_is_the_key(self) -> None:
        router = make_router(field="asset_uuid")
        result = route(router, "data.x", None, doc(asset_uuid="pump-7", value=1.5))
        assert routed(router, result, "pump-7") == "data.x"

    def test_a_non_ascii_key_is_fine(self) -> None:
        router = make_router(field="asset_uuid", template="out.{asset}")
        result = route(router, "data.x", None, doc(asset_uuid="Pumpe-ä-東京"))
        assert routed(router, result, "Pumpe-ä-東京") == "out.Pumpe-ä-東京"

    @pytest.mark.parametrize(
        ("value", "kind"),
        [(42, "int"), (4.5, "float"), (True, "bool"), (["a"], "list"), ({"a": 1}, "dict"), (None, "null")],
    )
    def test_a_field_that_is_not_a_string_is_rejected(self, value: Any, kind: str) -> None:
        router = make_router(field="asset_uuid")
        r = rejected(route(router, "data.x", None, doc(asset_uuid=value)), KEY_NOT_STRING)
        assert r.detail == f"asset_uuid is {kind}, not a string"

    def test_an_absent_field_is_no_key_field(self) -> None:
        router = make_router(field="asset_uuid")
        r = rejected(route(router, "data.x", None, doc(asset="pump-7")), NO_KEY_FIELD)
        assert r.header() == "no_key_field: no asset_uuid field"

    def test_a_nested_field_of_that_name_does_not_count(self) -> None:
        router = make_router(field="asset_uuid")
        rejected(route(router, "data.x", None, doc(inner={"asset_uuid": "pump-7"})), NO_KEY_FIELD)

    def test_an_empty_string_field_is_an_empty_key(self) -> None:
        router = make_router(field="asset_uuid")
        rejected(route(router, "data.x", None, doc(asset_uuid="")), EMPTY_KEY)

    @pytest.mark.parametrize("payload", [b"", b"not json", b"{", b'{"asset_uuid": "a",}', b"\x00\x01"])
    def test_a_payload_that_is_not_json_is_rejected(self, payload: bytes) -> None:
        router = make_router(field="asset_uuid")
        r = rejected(route(router, "data.x", None, payload), PAYLOAD_NOT_JSON)
        assert r.detail == "payload is not JSON"

    @pytest.mark.parametrize("payload", [b"[1, 2]", b'"pump-7"', b"42", b"null", b"true"])
    def test_json_that_is_not_an_object_is_rejected(self, payload: bytes) -> None:
        router = make_router(field="asset_uuid")
        r = rejected(route(router, "data.x", None, payload), PAYLOAD_NOT_JSON)
        assert r.detail == "payload is not a JSON object"

    @pytest.mark.parametrize(
        "payload",
        [
            b"[" * 30000 + b"]" * 30000,
            b'{"a":' * 10000 + b"1" + b"}" * 10000,
            b'{"asset_uuid": "pump-7", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}",
        ],
        ids=["array", "object", "inside-a-valid-document"],
    )
    def test_deeply_nested_json_is_a_rejection_not_a_crash(self, payload: bytes) -> None:
        # json.loads recurses: a hostile producer can send nesting deeper than the
        # recursion limit; the RecursionError must become a dead letter.
        router = make_router(field="asset_uuid")
        assert len(payload) <= router.settings.key.max_json_bytes
        with pytest.raises(RecursionError):
            json.loads(payload)  # the premise: this payload really does blow the stack
        rejected(route(router, "data.x", None, payload), PAYLOAD_NOT_JSON)

    def test_a_number_past_pythons_digit_limit_is_a_rejection_not_a_crash(self) -> None:
        # int() refuses more than 4300 digits with a ValueError (CVE-2020-10735).
        router = make_router(field="asset_uuid")
        payload = b'{"asset_uuid": "pump-7", "n": ' + b"7" * 5000 + b"}"
        rejected(route(router, "data.x", None, payload), PAYLOAD_NOT_JSON)

    def test_a_payload_over_max_json_bytes_is_not_parsed(self) -> None:
        router = make_router(field="asset_uuid", max_json_bytes=100)
        base = doc(asset_uuid="pump-7", pad="")
        at_limit = doc(asset_uuid="pump-7", pad="x" * (100 - len(base)))
        assert len(at_limit) == 100
        routed(router, route(router, "data.x", None, at_limit), "pump-7")
        over = doc(asset_uuid="pump-7", pad="x" * (101 - len(base)))
        r = rejected(route(router, "data.x", None, over), PAYLOAD_TOO_LARGE_TO_PARSE)
        assert r.detail == "payload is larger than 100 bytes"

    @pytest.mark.parametrize(
        "payload",
        [b'{"asset_uuid": "pump-\xff"}', b'{"asset_uuid": "pump-7", "x": "\xc3\x28"}', b"\xfe\xff\xfe"],
    )
    def test_a_payload_that_is_not_utf8_is_not_json(self, payload: bytes) -> None:
        router = make_router(field="asset_uuid")
        rejected(route(router, "data.x", None, payload), PAYLOAD_NOT_JSON)

    @pytest.mark.parametrize("escaped", ["\\ud800", "pump-\\udcff", "\\ufffd"])
    def test_a_json_escape_that_is_not_utf8_is_key_not_utf8(self, escaped: str) -> None:
        # Valid JSON text, but the string decodes to a lone surrogate or the replacement character.
        router = make_router(field="asset_uuid")
        payload = b'{"asset_uuid": "%s"}' % escaped.encode()
        rejected(route(router, "data.x", None, payload), KEY_NOT_UTF8)

    def test_route_subject_is_none(self) -> None:
        assert make_router(field="asset_uuid").route_subject is None


# --------------------------------------------------------------------------- key checks


class TestKeyProblem:
    @pytest.mark.parametrize("key", ["a", "pump-7", "ä", "東京", "🙂", "x" * MAX_KEY_BYTES])
    def test_good_keys(self, key: str) -> None:
        assert key_problem(key) is None

    def test_empty(self) -> None:
        assert key_problem("") == Rejection(EMPTY_KEY, "asset id is empty")

    @pytest.mark.parametrize("key", ["\udcff", "pump-\ud800", "\udc80abc", "\ufffd-x", "pump\ufffd"])
    def test_not_utf8(self, key: str) -> None:
        assert key_problem(key) == Rejection(KEY_NOT_UTF8, "asset id is not valid UTF-8")

    @pytest.mark.parametrize(
        ("key", "too_long"),
        [
            ("x" * MAX_KEY_BYTES, False),
            ("x" * (MAX_KEY_BYTES + 1), True),
            ("🙂" * (MAX_KEY_BYTES // 4), False),  # 1024 bytes in 256 characters
            ("🙂" * (MAX_KEY_BYTES // 4) + "x", True),  # 1025 bytes in 257 characters
            ("ä" * (MAX_KEY_BYTES // 2), False),
            ("ä" * (MAX_KEY_BYTES // 2) + "x", True),
            ("東" * 341 + "x", False),  # 1024 bytes
            ("東" * 342, True),  # 1026 bytes in only 342 characters
        ],
    )
    def test_too_long_counts_utf8_bytes_not_characters(self, key: str, too_long: bool) -> None:
        assert len(key.encode()) > MAX_KEY_BYTES if too_long else len(key.encode()) <= MAX_KEY_BYTES
        expected = Rejection(KEY_TOO_LONG, "asset id is longer than 1024 bytes") if too_long else None
        assert key_problem(key) == expected

    def test_every_key_mode_applies_the_checks(self) -> None:
        long_key = "k" * (MAX_KEY_BYTES + 1)
        token = make_router(token=1)
        rejected(route(token, f"assets.{long_key}.x"), KEY_TOO_LONG)
        header = make_router(header="Asset-Id")
        rejected(route(header, "d.x", {"Asset-Id": long_key}), KEY_TOO_LONG)
        field = make_router(field="id")
        rejected(route(field, "d.x", None, doc(id=long_key)), KEY_TOO_LONG)
        rejected(route(field, "d.x", None, doc(id="a\udcffb")), KEY_NOT_UTF8)


# --------------------------------------------------------------------------- templates


class TestTemplates:
    @pytest.mark.parametrize(
        ("template", "expected"),
        [
            ("{subject}", "assets.pump-7.temp"),
            ("{asset}", "pump-7"),
            ("{token[0]}", "assets"),
            ("{token[2]}", "temp"),
            ("fixed.subject", "fixed.subject"),
            ("out.{asset}", "out.pump-7"),
            ("out.{subject}", "out.assets.pump-7.temp"),
            ("{token[2]}.{asset}.{token[0]}", "temp.pump-7.assets"),
            ("a{asset}b.{token[2]}-x", "apump-7b.temp-x"),
            ("{asset}.{asset}", "pump-7.pump-7"),
            ("x.{subject}.{asset}.{token[1]}", "x.assets.pump-7.temp.pump-7.pump-7"),
        ],
    )
    def test_render(self, template: str, expected: str) -> None:
        assert compile_template(template)("assets.pump-7.temp", "pump-7") == expected
        router = make_router(token=1, template=template)
        assert routed(router, route(router, "assets.pump-7.temp"), "pump-7") == expected

    def test_a_token_the_subject_does_not_have_is_bad_target_subject(self) -> None:
        with pytest.raises(IndexError):
            compile_template("{token[5]}")("a.b", "b")
        router = make_router(token=1, template="out.{token[3]}")
        assert routed(router, route(router, "assets.a1.x.y"), "a1") == "out.y"
        r = rejected(route(router, "assets.a1.x"), BAD_TARGET_SUBJECT)
        assert r.detail == "subject has no token 3 for the template"

    @pytest.mark.parametrize(
        ("asset", "problem"),
        [
            ("*", "a wildcard token"),
            (">", "a wildcard token"),
            ("a.*", "a wildcard token"),
            ("a b", "whitespace or a control character"),
            ("a\tb", "whitespace or a control character"),
            ("a\r\nb", "whitespace or a control character"),
            ("a\x00b", "whitespace or a control character"),
            ("a\x1bb", "whitespace or a control character"),
            ("a\x7fb", "whitespace or a control character"),
            ("a..b", "an empty token"),
            (".a", "an empty token"),
            ("a.", "an empty token"),
        ],
    )
    def test_a_template_expanding_to_an_invalid_subject_is_rejected(self, asset: str, problem: str) -> None:
        router = make_router(header="Asset-Id", template="out.{asset}.v1")
        r = rejected(route(router, "d.x", {"Asset-Id": asset}), BAD_TARGET_SUBJECT)
        assert r.detail == f"target subject has {problem}"

    def test_an_asset_alone_can_expand_to_an_empty_subject_token(self) -> None:
        router = make_router(field="id", template="{asset}")
        r = rejected(route(router, "d.x", None, doc(id=".")), BAD_TARGET_SUBJECT)
        assert r.detail == "target subject has an empty token"

    def test_the_source_subject_is_checked_too(self) -> None:
        # {subject}: a source subject with a bad byte in another token is not forwardable.
        router = make_router(token=1)
        r = rejected(route(router, "assets.a1.t\udcff"), BAD_TARGET_SUBJECT)
        assert r.detail == "target subject has bytes that are not UTF-8"
        router = make_router(token=1, template="out.{token[2]}")
        rejected(route(router, "assets.a1.t\ufffd"), BAD_TARGET_SUBJECT)

    @pytest.mark.parametrize(
        ("subject", "problem"),
        [
            ("", "no tokens"),
            ("a..b", "an empty token"),
            ("a.*.b", "a wildcard token"),
            ("a.>", "a wildcard token"),
            ("a b", "whitespace or a control character"),
            ("a\nb", "whitespace or a control character"),
            ("a.\udcff", "bytes that are not UTF-8"),
            ("a.b", None),
            ("a*.b>", None),  # wildcards only count as whole tokens
            ("ä.東京.🙂", None),
        ],
    )
    def test_subject_problem(self, subject: str, problem: str | None) -> None:
        assert subject_problem(subject) == problem


# --------------------------------------------------------------------------- caches and the ring


class TestCachesAndRing:
    def test_repeat_subjects_return_the_identical_cached_object(self) -> None:
        ring = CountingRing()
        router = make_router(token=1, ring=ring)
        first = route(router, "assets.a1.x")
        assert route(router, "assets.a1.x") is first
        assert router.route_subject is not None
        assert router.route_subject("assets.a1.x") is first
        bad = route(router, "assets")
        assert isinstance(bad, Rejection)
        assert route(router, "assets") is bad  # rejections are cached as well
        assert ring.calls == ["a1"]

    def test_the_subject_cache_respects_cache_size(self) -> None:
        ring = CountingRing()
        router = make_router(token=1, ring=ring, cache_size=50)
        assert router.route_subject is not None
        cache = router.route_subject.__self__  # the ComputingCache behind the fast path
        for i in range(1000):
            route(router, f"assets.a{i}.x")
            assert cache.entries() <= 100
        assert cache.entries() >= 50
        # Still correct after many rotations: a subject long evicted is recomputed the same.
        assert routed(router, route(router, "assets.a3.x"), "a3") == "assets.a3.x"

    def test_the_cluster_cache_respects_cache_size(self) -> None:
        ring = CountingRing()
        router = make_router(header="Asset-Id", ring=ring, cache_size=10)
        for i in range(200):
            routed(router, route(router, "d.x", {"Asset-Id": f"a{i}"}), f"a{i}")
        assert router._cluster_of.entries() <= 20
        assert len(ring.calls) == 200

    def test_the_ring_is_asked_once_per_asset(self) -> None:
        ring = CountingRing()
        router = make_router(header="Asset-Id", ring=ring)
        for _ in range(5):
            for asset in ("a", "b", "c"):
                routed(router, route(router, "d.x", {"Asset-Id": asset}), asset)
                router.cluster_for(asset)
        assert sorted(ring.calls) == ["a", "b", "c"]

    def test_cluster_for_agrees_with_the_ring(self) -> None:
        ring = RendezvousRing({"C1": 1, "C2": 2, "C3": 1})
        router = make_router(token=1, ring=ring, cache_size=64)
        rng = random.Random(7)
        assets = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(2000)]
        for asset in assets + assets[:100]:  # the repeats are served from the cache
            expected = ring.cluster_for(asset)
            assert router.cluster_for(asset) == expected
            assert route(router, f"assets.{asset}.x") == (TARGETS[expected], f"assets.{asset}.x")
        # Every cluster is used, so the agreement is not trivially about a single cluster.
        assert {router.cluster_for(a) for a in assets} == set(CLUSTERS)

    def test_route_subject_only_in_subject_token_mode(self) -> None:
        assert make_router(token=1).route_subject is not None
        assert make_router(header="Asset-Id").route_subject is None
        assert make_router(field="id").route_subject is None


def test_rejection_header_format_and_equality() -> None:
    r = Rejection("no_key_field", "no asset_uuid field")
    assert r.header() == "no_key_field: no asset_uuid field"
    assert r.header().split(": ", 1) == [r.reason, r.detail]
    assert r == Rejection("no_key_field", "no asset_uuid field")
    assert r != Rejection("no_key_field", "other")
    assert hash(r) == hash(Rejection("no_key_field", "no asset_uuid field"))
    assert "no_key_field" in repr(r)


class TestGraceRoutes:
    """After a topology change, an asset whose cluster changed is also published to its old one."""

    def test_a_moved_asset_gets_its_new_and_its_old_target(self) -> None:
        previous = RendezvousRing({"C1": 1, "C2": 1})
        ring = RendezvousRing({"C1": 1, "C2": 1, "C3": 1})
        router = Router(make_router(token=1).settings, ring, TARGETS, previous=previous)
        moved = stayed = 0
        for i in range(300):
            asset = f"a{i}"
            result = route(router, f"assets.{asset}.x")
            new, old = ring.cluster_for(asset), previous.cluster_for(asset)
            if new != old:
                assert result.__class__ is GraceRoute
                assert result == (TARGETS[new], f"assets.{asset}.x", TARGETS[old])
                moved += 1
            else:
                assert result.__class__ is tuple  # the hot path's plain route
                assert result == (TARGETS[new], f"assets.{asset}.x")
                stayed += 1
        assert moved > 0
        assert stayed > 0

    def test_an_old_cluster_that_is_gone_gets_no_copy(self) -> None:
        previous = RendezvousRing({"C1": 1, "Gone": 5})
        ring = RendezvousRing({"C1": 1})
        router = Router(make_router(header="Asset-Id").settings, ring, TARGETS, previous=previous)
        for i in range(50):
            result = route(router, "d.x", {"Asset-Id": f"a{i}"})
            assert result.__class__ is tuple
            assert result == (TARGETS["C1"], "d.x")

    def test_rejections_are_not_affected(self) -> None:
        previous = RendezvousRing({"C1": 1})
        router = Router(make_router(token=1).settings, RendezvousRing({"C2": 1}), TARGETS, previous=previous)
        rejected(route(router, "assets"), NO_KEY_TOKEN)
