"""Message -> (target, subject), or the reason it cannot be routed. Pure: no I/O.

The router is generic over what a "target" is: the service hands it the live
``NatsCluster`` objects so the hot path gets the connection in the same lookup that
finds the route; the CLI hands it plain names.

With the asset id in the subject (the default and fastest mode) everything about a
message's route depends on its subject alone, so the whole decision is cached per
subject: a repeat subject costs one dict lookup.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from .cache import ComputingCache
from .config import TEMPLATE_FIELD_RE, RoutingSettings
from .hashring import Ring

T = TypeVar("T")

MAX_KEY_BYTES = 1024

# Dead-letter reasons: a small fixed set, used as a metric label.
NO_KEY_TOKEN = "no_key_token"
NO_KEY_HEADER = "no_key_header"
NO_KEY_FIELD = "no_key_field"
EMPTY_KEY = "empty_key"
KEY_NOT_UTF8 = "key_not_utf8"
KEY_NOT_STRING = "key_not_string"
KEY_TOO_LONG = "key_too_long"
PAYLOAD_NOT_JSON = "payload_not_json"
PAYLOAD_TOO_LARGE_TO_PARSE = "payload_too_large_to_parse"
BAD_TARGET_SUBJECT = "bad_target_subject"


class Rejection:
    """Why a message cannot be routed: a short code (metric label) and a detail.

    ``asset`` and ``cluster`` are context for the log line where they are known (the
    key was found; the message was routed and its cluster refused it); they take no
    part in equality.
    """

    __slots__ = ("asset", "cluster", "detail", "reason")

    def __init__(
        self, reason: str, detail: str, *, asset: str | None = None, cluster: str | None = None
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.asset = asset
        self.cluster = cluster

    def header(self) -> str:
        """The ``Forwarder-Error`` header value: code first, so tools can split on ':'."""
        return f"{self.reason}: {self.detail}"

    def __repr__(self) -> str:
        return f"Rejection({self.reason!r}, {self.detail!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rejection) and (other.reason, other.detail) == (self.reason, self.detail)

    def __hash__(self) -> int:
        return hash((self.reason, self.detail))


class GraceRoute(tuple):  # type: ignore[type-arg]
    """``(target, subject, previous target)``: an asset that moved in a topology change,
    published to its old cluster too while the grace window lasts. A distinct class, so
    the hot path's ``route.__class__ is tuple`` test stays the only cost of the feature."""

    __slots__ = ()


Template = Callable[[str, str], str]  # (source subject, asset) -> target subject


def compile_template(template: str) -> Template:
    """Turn ``"{subject}"``-style templates into a function, once, at start-up."""
    if template == "{subject}":
        return lambda subject, asset: subject
    parts: list[str | int] = []  # literal text, or -1 subject, -2 asset, N token index
    pos = 0
    for m in TEMPLATE_FIELD_RE.finditer(template):
        if m.start() > pos:
            parts.append(template[pos : m.start()])
        name = m.group(1)
        parts.append(-1 if name == "subject" else -2 if name == "asset" else int(name[6:-1]))
        pos = m.end()
    if pos < len(template):
        parts.append(template[pos:])
    needs_tokens = any(isinstance(p, int) and p >= 0 for p in parts)

    def render(subject: str, asset: str) -> str:
        tokens = subject.split(".") if needs_tokens else ()
        out = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
            elif part == -1:
                out.append(subject)
            elif part == -2:
                out.append(asset)
            elif part < len(tokens):
                out.append(tokens[part])
            else:
                raise IndexError(part)
        return "".join(out)

    return render


def subject_problem(subject: str) -> str | None:
    """Why ``subject`` cannot be published to, or None when it can."""
    if not subject:
        return "no tokens"
    for token in subject.split("."):
        if not token:
            return "an empty token"
        if token in ("*", ">"):
            return "a wildcard token"
    for ch in subject:
        if ch <= " " or ch == "\x7f":
            return "whitespace or a control character"
    if not _is_utf8(subject):
        return "bytes that are not UTF-8"
    return None


def key_problem(key: str) -> Rejection | None:
    if not key:
        return Rejection(EMPTY_KEY, "asset id is empty")
    if not _is_utf8(key):
        return Rejection(KEY_NOT_UTF8, "asset id is not valid UTF-8", asset=shown_asset(key))
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return Rejection(
            KEY_TOO_LONG, f"asset id is longer than {MAX_KEY_BYTES} bytes", asset=shown_asset(key)
        )
    return None


SHOWN_ASSET_CHARS = 200


def shown_asset(key: str) -> str:
    """An asset id as a log line may show it: lone surrogates (undecodable bytes, or a JSON
    ``\\udXXX`` escape) escaped, cut to a bounded length."""
    return key[:SHOWN_ASSET_CHARS].encode("utf-8", "backslashreplace").decode("utf-8")


def _is_utf8(text: str) -> bool:
    # Undecodable bytes reach us as lone surrogates (surrogateescape) or as U+FFFD
    # (nats-py decodes header values with errors="replace"): both mean "not UTF-8".
    if text.isascii():
        return True
    if "\ufffd" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Router(Generic[T]):
    """Route messages of one routing config to ``targets`` (cluster name -> target)."""

    def __init__(
        self, routing: RoutingSettings, ring: Ring, targets: Mapping[str, T], *, previous: Ring | None = None
    ) -> None:
        """``previous``: the ring before a topology change; during the grace window an asset
        that it places elsewhere gets a ``GraceRoute`` (its old target must be in ``targets``)."""
        self.settings = routing
        self.ring = ring
        self.previous = previous
        self._targets = dict(targets)
        self._render = compile_template(routing.subject_template)
        self._cluster_of: ComputingCache[str, str] = ComputingCache(ring.cluster_for, routing.cache_size)
        self._previous_of: ComputingCache[str, str] | None = (
            ComputingCache(previous.cluster_for, routing.cache_size) if previous is not None else None
        )
        key = routing.key
        self.route: Callable[[str, Mapping[str, str] | None, bytes], tuple[T, str] | Rejection]
        # With the key in the subject, the whole route is a function of the subject:
        # ``route_subject`` is then that cached function (a dict lookup on a hit) and the
        # hot path calls it directly; None in the other key modes.
        self.route_subject: Callable[[str], tuple[T, str] | Rejection] | None = None
        if key.kind == "subject_token":
            by_subject: ComputingCache[str, tuple[T, str] | Rejection] = ComputingCache(
                self._route_subject, routing.cache_size
            )
            self.route_subject = lookup = by_subject.__getitem__
            self.route = lambda subject, headers, payload: lookup(subject)
        elif key.kind == "header":
            self.route = self._route_header
        else:
            self.route = self._route_json

    def cluster_for(self, asset: str) -> str:
        """The cluster name that owns ``asset`` (for /route and the CLI)."""
        return self._cluster_of[asset]

    def target(self, name: str) -> T:
        return self._targets[name]

    def asset_of(self, subject: str, headers: Mapping[str, str] | None, payload: bytes) -> str | None:
        """The asset id of a message, where it has one (no validation, no cache): for the
        log line of a routed message that its cluster refused. Not for the hot path."""
        key = self.settings.key
        if key.kind == "subject_token":
            tokens = subject.split(".")
            return tokens[key.token] if key.token < len(tokens) else None
        if key.kind == "header":
            value = headers.get(key.header) if headers else None
            return value.strip() if value is not None else None
        if len(payload) > key.max_json_bytes:
            return None
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            return None
        value = doc.get(key.field) if isinstance(doc, dict) else None
        return value if isinstance(value, str) else None

    # ---- per key mode

    def _route_subject(self, subject: str) -> tuple[T, str] | Rejection:
        tokens = subject.split(".")
        index = self.settings.key.token
        if index >= len(tokens):
            return Rejection(NO_KEY_TOKEN, f"subject has no token {index}")
        return self._finish(subject, tokens[index])

    def _route_header(
        self, subject: str, headers: Mapping[str, str] | None, payload: bytes
    ) -> tuple[T, str] | Rejection:
        name = self.settings.key.header
        value = headers.get(name) if headers else None
        if value is None:
            return Rejection(NO_KEY_HEADER, f"no {name} header")
        return self._finish(subject, value.strip())

    def _route_json(
        self, subject: str, headers: Mapping[str, str] | None, payload: bytes
    ) -> tuple[T, str] | Rejection:
        key = self.settings.key
        if len(payload) > key.max_json_bytes:
            return Rejection(PAYLOAD_TOO_LARGE_TO_PARSE, f"payload is larger than {key.max_json_bytes} bytes")
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return Rejection(PAYLOAD_NOT_JSON, "payload is not JSON")
        if not isinstance(doc, dict):
            return Rejection(PAYLOAD_NOT_JSON, "payload is not a JSON object")
        if key.field not in doc:
            return Rejection(NO_KEY_FIELD, f"no {key.field} field")
        value = doc[key.field]
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            return Rejection(KEY_NOT_STRING, f"{key.field} is {kind}, not a string")
        return self._finish(subject, value)

    def _finish(self, subject: str, asset: str) -> tuple[T, str] | Rejection:
        rejection = key_problem(asset)
        if rejection is not None:
            return rejection
        try:
            target_subject = self._render(subject, asset)
        except IndexError as exc:
            return Rejection(
                BAD_TARGET_SUBJECT,
                f"subject has no token {exc.args[0]} for the template",
                asset=shown_asset(asset),
            )
        problem = subject_problem(target_subject)
        if problem is not None:
            return Rejection(BAD_TARGET_SUBJECT, f"target subject has {problem}", asset=shown_asset(asset))
        name = self._cluster_of[asset]
        if self._previous_of is not None:
            old = self._previous_of[asset]
            if old != name and old in self._targets:
                return GraceRoute((self._targets[name], target_subject, self._targets[old]))
        return self._targets[name], target_subject
