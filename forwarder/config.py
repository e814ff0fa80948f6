"""YAML + environment -> frozen, typed settings.

Everything is validated here, up front, so that the rest of the service never meets a
bad value at run time. Every error is one line that names the file and the key.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml

MAX_CONFIG_BYTES = 1024 * 1024
MAX_YAML_ALIASES = 64
ENV_CLUSTER_PREFIX = "NATS_CLUSTER_"
CLUSTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
SUBJECT_TOKEN_RE = re.compile(r"^[^\s.*>]+$")
TEMPLATE_FIELD_RE = re.compile(r"\{([^{}]*)\}")
ENV_REF_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{[^}]*\}?")
URL_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
SCHEMES = ("nats", "tls")

KeyKind = Literal["subject_token", "header", "json_field"]
Algorithm = Literal["rendezvous", "openfactory"]
DeliverPolicy = Literal["all", "new", "last", "last_per_subject"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "console"]


class ConfigError(Exception):
    """An invalid configuration: ``file: key: what is wrong`` on one line."""

    def __init__(self, file: str, key: str, message: str) -> None:
        self.file = file
        self.key = key
        self.message = message
        super().__init__(_one_line(f"{file}: {key}: {message}" if key else f"{file}: {message}"))


def _one_line(text: str) -> str:
    """Control characters (a newline in a YAML key or value) escaped: an error stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@dataclass(frozen=True)
class Secret:
    """A secret value that never shows itself in a repr, a log line or an error."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def reveal(self) -> str:
        return self.value


@dataclass(frozen=True)
class AuthSettings:
    user: str | None = None
    password: Secret | None = None
    password_file: str | None = None
    token: Secret | None = None
    token_file: str | None = None
    nkeys_seed: str | None = None  # a path to the seed file
    credentials: str | None = None  # a path to a .creds file (JWT + seed)


@dataclass(frozen=True)
class TlsSettings:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class ConnectionSettings:
    """How to reach one NATS deployment: the source or one target cluster."""

    servers: tuple[str, ...]
    name: str
    connect_timeout: float = 2.0
    reconnect_time_wait: float = 2.0
    max_reconnect_attempts: int = -1
    ping_interval: float = 20.0
    max_outstanding_pings: int = 3
    pending_size: int = 8 * 1024 * 1024
    auth: AuthSettings | None = None
    tls: TlsSettings | None = None

    def __repr__(self) -> str:
        # A server URL may carry user:password@: a repr (a log line, a traceback) shows it redacted.
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["servers"] = tuple(redact_url(url) for url in self.servers)
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


@dataclass(frozen=True)
class JetStreamSourceSettings:
    stream: str
    durable: str
    ack_wait: float = 30.0
    max_ack_pending: int = 20000
    max_deliver: int = -1
    backoff: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0)
    deliver_policy: DeliverPolicy = "all"
    idle_heartbeat: float = 5.0
    # Messages for a cluster that is down wait in this stream (on the source) instead of
    # holding max_ack_pending slots; None: no parking, they are only nak'd with back-off.
    park_stream: str | None = "FORWARDER_PARKED"
    park_prefix: str = "forwarder.parked"

    @property
    def confirm_timeout(self) -> float:
        """How long a batch may wait for its confirmation: well inside ack_wait, so that a
        message is not redelivered while the first delivery is still being confirmed."""
        return min(5.0, self.ack_wait / 2)


@dataclass(frozen=True)
class SourceSettings:
    connection: ConnectionSettings
    subject: str = "assets.>"
    queue_group: str | None = "asset-forwarder"
    pending_msgs_limit: int = 65536
    pending_bytes_limit: int = 64 * 1024 * 1024
    jetstream: JetStreamSourceSettings | None = None


@dataclass(frozen=True)
class KeySettings:
    kind: KeyKind
    token: int = 0  # subject_token
    header: str = ""  # header
    field: str = ""  # json_field
    max_json_bytes: int = 65536  # json_field: larger payloads are not parsed


@dataclass(frozen=True)
class HashingSettings:
    algorithm: Algorithm = "rendezvous"
    replicas: int = 128  # ring points per cluster, openfactory only


@dataclass(frozen=True)
class RoutingSettings:
    key: KeySettings
    subject_template: str = "{subject}"
    hashing: HashingSettings = HashingSettings()
    dead_letter_subject: str = "forwarder.dead"
    cache_size: int = 262144


@dataclass(frozen=True)
class JetStreamTargetSettings:
    max_pending: int = 4000  # async publishes awaiting their PubAck
    ack_timeout: float = 5.0


@dataclass(frozen=True)
class ClusterSettings:
    name: str
    connection: ConnectionSettings
    weight: float = 1.0
    weight_set: bool = False
    jetstream: JetStreamTargetSettings | None = None


@dataclass(frozen=True)
class HttpSettings:
    host: str = "0.0.0.0"
    port: int = 8080


@dataclass(frozen=True)
class LogSettings:
    level: LogLevel = "info"
    format: LogFormat = "json"


@dataclass(frozen=True)
class TopologySettings:
    """Live topology: kept in a key-value bucket on the source connection (None: the file only)."""

    kv_bucket: str | None = None
    grace: float = 30.0  # seconds a moved asset is published to its old cluster too
    apply_timeout: float = 30.0  # seconds to connect new clusters before a version is refused
    poll_interval: float = 10.0  # seconds between reads of the bucket, behind the watch


@dataclass(frozen=True)
class FileRef:
    """A file that the config names (credentials, certificates): checked at start-up."""

    key: str
    path: str


@dataclass(frozen=True)
class Settings:
    file: str
    source: SourceSettings
    routing: RoutingSettings
    clusters: tuple[ClusterSettings, ...]
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
    shutdown_timeout: float = 15.0
    workers: int = 1
    topology: TopologySettings = TopologySettings()
    file_refs: tuple[FileRef, ...] = ()

    def cluster(self, name: str) -> ClusterSettings:
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise KeyError(name)

    def secrets(self) -> list[str]:
        """Every secret value written in the config (for log redaction)."""
        return [secret for _, conn in iter_connections(self) for secret in connection_secrets(conn)]

    def missing_files(self) -> list[FileRef]:
        """The referenced files that cannot be read here (e.g. a Secret not mounted)."""
        return [ref for ref in self.file_refs if not os.access(ref.path, os.R_OK)]


# --------------------------------------------------------------------------- URLs


def redact_url(url: str) -> str:
    """``nats://user:pass@host:4222`` -> ``nats://***:***@host:4222``: never show userinfo.

    Everything up to the last ``@`` counts as userinfo, even a ``/``, ``?`` or ``#`` (a
    password is not always percent-encoded), and a URL without a scheme is redacted too.
    """
    m = URL_SCHEME_RE.match(url)
    prefix = m.group(0) if m else ""
    rest = url[len(prefix) :]
    at = rest.rfind("@")
    if at < 0:
        return url
    return f"{prefix}***:***@{rest[at + 1 :]}" if ":" in rest[:at] else f"{prefix}***@{rest[at + 1 :]}"


def server_address(url: str) -> tuple[str, int]:
    """(host, port) of a validated server URL, for duplicate detection."""
    parts = urlsplit(url)
    return (parts.hostname or "").lower(), parts.port or 4222


# --------------------------------------------------------------------------- YAML


class _Expanded(str):
    """A string that came from ``${VAR}`` expansion: numeric keys may parse it."""


class _BoundedLoader(yaml.SafeLoader):
    """Safe YAML with a bound on aliases (no billion laughs) and no duplicate keys."""

    aliases_seen = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases_seen += 1
            if self.aliases_seen > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} YAML aliases")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *defaults": the merged keys may be overridden, that is its point
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # a list or mapping as a key: SafeLoader reports it below
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, shown: str) -> Any:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(shown, "", f"cannot read the file ({exc.strerror or exc})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(shown, "", f"file is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(shown, "", "file is not valid UTF-8") from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(shown, "", f"YAML syntax error{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(shown, "", f"YAML error: {exc}") from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise ConfigError(shown, "", "YAML error: nested too deeply") from None


def _expand_env(value: str, env: Mapping[str, str], fail: Callable[[str], ConfigError]) -> str:
    def replace(m: re.Match[str]) -> str:
        whole = m.group(0)
        if whole == "$$":
            return "$"
        name = m.group(1)
        if name is None:  # not quoted: the value may be a password that happens to hold "${"
            raise fail(
                f"malformed environment reference at character {m.start() + 1} "
                "(use ${VAR} or ${VAR:-default}; $$ for a literal $)"
            )
        val = env.get(name)
        if val:
            return val
        default = m.group(2)
        if default is not None:
            return default
        if val is not None:  # set but empty, no default: empty is what was asked for
            return val
        raise fail(f"environment variable {name} is not set and has no default (${{{name}:-default}})")

    if "$" not in value:
        return value
    return _Expanded(ENV_REF_RE.sub(replace, value))


# --------------------------------------------------------------------------- sections

T = TypeVar("T")
_MISSING: Any = object()


class _Section:
    """One mapping of the config: typed getters that name the key on every error."""

    def __init__(self, loader: _Loader, data: Any, path: str) -> None:
        self.loader = loader
        self.path = path
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error("", f"must be a mapping, got {_type_name(data)}")
        self.data: dict[Any, Any] = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.loader.shown, self.key(name) if name else self.path, message)

    def has(self, name: str) -> bool:
        return name in self.data and self.data[name] is not None

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            if default is _MISSING:
                raise self.error(name, "is required")
            return default
        value = self.data[name]
        if isinstance(value, str):
            value = _expand_env(value, self.loader.env, lambda msg: self.error(name, msg))
        return value

    def text(self, name: str, default: Any = _MISSING, *, secret: bool = False, empty: bool = False) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.error(name, f"must be a string, got {_type_name(value)}")
        text = str(value)
        if not text and not empty:
            raise self.error(name, "must not be empty")
        if secret:
            return Secret(text)
        return text

    def number(
        self,
        name: str,
        default: Any = _MISSING,
        *,
        integer: bool = False,
        minimum: float | None = None,
        exclusive_minimum: float | None = None,
    ) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        kind = "an integer" if integer else "a number"
        if isinstance(value, _Expanded):
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                raise self.error(name, f"must be {kind}, got {value!r} from the environment") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"must be {kind}, got {_type_name(value)}")
        if integer and isinstance(value, float):
            if not value.is_integer():
                raise self.error(name, f"must be an integer, got {value}")
            value = int(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise self.error(name, f"must be a finite number, got {value}")
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be >= {minimum:g}, got {value}")
        if exclusive_minimum is not None and value <= exclusive_minimum:
            raise self.error(name, f"must be > {exclusive_minimum:g}, got {value}")
        return value if integer else float(value)

    def flag(self, name: str, default: Any = _MISSING) -> Any:
        value = self.raw(name, default)
        if isinstance(value, _Expanded) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {_type_name(value)}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: Any = _MISSING) -> Any:
        value = self.text(name, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def text_list(self, name: str, default: Any = _MISSING) -> tuple[str, ...]:
        value = self.raw(name, default)
        expanded = isinstance(value, str)  # raw() expanded it: its items must not be expanded again
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if isinstance(value, _Expanded) else [value]
        if not isinstance(value, list):
            raise self.error(name, f"must be a list of strings, got {_type_name(value)}")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, str) and not expanded:
                item = _expand_env(item, self.loader.env, self._failer(f"{name}[{i}]"))
            if not isinstance(item, str) or not item:
                raise self.error(f"{name}[{i}]", f"must be a non-empty string, got {_type_name(item)}")
            out.append(item)
        return tuple(out)

    def _failer(self, name: str) -> Callable[[str], ConfigError]:
        return lambda message: self.error(name, message)

    def section(self, name: str, *, required: bool = False) -> _Section | None:
        self.used.add(name)
        if not self.has(name):
            if required:
                raise self.error(name, "is required")
            return None
        return _Section(self.loader, self.data[name], self.key(name))

    def file(self, name: str) -> str | None:
        path = self.text(name, None)
        if path is not None:
            self.loader.file_refs.append(FileRef(self.key(name), path))
        return path  # type: ignore[no-any-return]

    def done(self, known: tuple[str, ...] = ()) -> None:
        """Reject keys nobody asked for: a typo must not be silently ignored."""
        allowed = self.used | set(known)
        for k in self.data:
            if not isinstance(k, str):
                raise self.error("", f"keys must be strings, got {_type_name(k)} {k!r}")
            if k not in allowed:
                hint = difflib.get_close_matches(k, sorted(allowed), n=1)
                suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise self.error(k, f"unknown key{suffix}")


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", bool: "a boolean", int: "an integer", float: "a number"}.get(
        type(value), "a string" if isinstance(value, str) else type(value).__name__
    )


# --------------------------------------------------------------------------- the loader

CONNECTION_KEYS = (
    "servers",
    "name",
    "connect_timeout",
    "reconnect_time_wait",
    "max_reconnect_attempts",
    "ping_interval",
    "max_outstanding_pings",
    "pending_size",
    "auth",
    "tls",
)


class _Loader:
    def __init__(self, shown: str, env: Mapping[str, str]) -> None:
        self.shown = shown
        self.env = env
        self.file_refs: list[FileRef] = []
        self.server_owner: dict[tuple[str, int], str] = {}

    def settings(self, doc: Any) -> Settings:
        top = _Section(self, doc, "")
        source = self.source(top.section("source", required=True))  # type: ignore[arg-type]
        routing = self.routing(top.section("routing") or _Section(self, {}, "routing"), source)
        clusters = self.clusters(top)
        js = source.jetstream
        for cluster in clusters:
            if (
                js is not None
                and cluster.jetstream is not None
                and cluster.jetstream.ack_timeout >= js.ack_wait
            ):
                raise ConfigError(
                    self.shown,
                    f"clusters.{cluster.name}.jetstream.ack_timeout",
                    f"must be shorter than source.jetstream.ack_wait ({js.ack_wait:g}): a message would be "
                    "redelivered while its PubAck is still awaited",
                )
        if routing.hashing.algorithm == "openfactory":
            for cluster in clusters:
                if cluster.weight_set:
                    raise ConfigError(
                        self.shown,
                        f"clusters.{cluster.name}.weight",
                        "weights are not supported with routing.hashing.algorithm openfactory",
                    )
        http = top.section("http") or _Section(self, {}, "http")
        log = top.section("log") or _Section(self, {}, "log")
        settings = Settings(
            file=self.shown,
            source=source,
            routing=routing,
            clusters=clusters,
            http=HttpSettings(
                host=http.text("host", "0.0.0.0"),
                port=http.number("port", 8080, integer=True, minimum=0),
            ),
            log=LogSettings(
                level=log.choice("level", ("debug", "info", "warning", "error"), "info"),
                format=log.choice("format", ("json", "console"), "json"),
            ),
            shutdown_timeout=top.number("shutdown_timeout", 15.0, exclusive_minimum=0),
            workers=top.number("workers", 1, integer=True, minimum=1),
            topology=self.topology(top.section("topology")),
            file_refs=tuple(self.file_refs),
        )
        if settings.http.port > 65535:
            raise ConfigError(self.shown, "http.port", f"must be <= 65535, got {settings.http.port}")
        http.done()
        log.done()
        top.done()
        return settings

    def topology(self, sec: _Section | None) -> TopologySettings:
        if sec is None:
            return TopologySettings()
        settings = TopologySettings(
            kv_bucket=sec.text("kv_bucket", None),
            grace=sec.number("grace", 30.0, minimum=0),
            apply_timeout=sec.number("apply_timeout", 30.0, exclusive_minimum=0),
            poll_interval=sec.number("poll_interval", 10.0, exclusive_minimum=0),
        )
        if settings.kv_bucket is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", settings.kv_bucket):
            raise sec.error("kv_bucket", f"is not a valid bucket name: {settings.kv_bucket!r}")
        sec.done()
        return settings

    # ---- connections

    def connection(self, sec: _Section, default_name: str, owner: str | None) -> ConnectionSettings:
        servers = sec.text_list("servers")
        if not servers:
            raise sec.error("servers", "must name at least one server")
        seen: set[tuple[str, int]] = set()
        for i, url in enumerate(servers):
            addr = self.check_url(sec, f"servers[{i}]", url)
            if addr in seen:
                raise sec.error(f"servers[{i}]", f"duplicate server {redact_url(url)}")
            seen.add(addr)
            if owner is not None:
                other = self.server_owner.setdefault(addr, owner)
                if other != owner:
                    raise sec.error(f"servers[{i}]", f"server {redact_url(url)} is also in cluster {other}")
        return ConnectionSettings(
            servers=servers,
            name=sec.text("name", default_name),
            connect_timeout=sec.number("connect_timeout", 2.0, exclusive_minimum=0),
            reconnect_time_wait=sec.number("reconnect_time_wait", 2.0, minimum=0),
            max_reconnect_attempts=sec.number("max_reconnect_attempts", -1, integer=True, minimum=-1),
            ping_interval=sec.number("ping_interval", 20.0, exclusive_minimum=0),
            max_outstanding_pings=sec.number("max_outstanding_pings", 3, integer=True, minimum=1),
            pending_size=sec.number("pending_size", 8 * 1024 * 1024, integer=True, minimum=0),
            auth=self.auth(sec.section("auth")),
            tls=self.tls(sec.section("tls")),
        )

    def check_url(self, sec: _Section, key: str, url: str) -> tuple[str, int]:
        shown = redact_url(url)
        if "://" not in url:
            raise sec.error(key, f"bad server URL {shown}: expected nats://host:port or tls://host:port")
        if not url.isprintable() or any(c.isspace() for c in url):  # urllib drops tabs and newlines
            raise sec.error(key, f"bad server URL {shown}: contains whitespace or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            # urllib quotes the port or the netloc, which is part of the password when the
            # password has an unencoded '/', '?' or '#': then say it without the quote.
            reason = str(exc) if "@" not in url else "cannot parse the host and port"
            raise sec.error(key, f"bad server URL {shown}: {reason}") from None
        if parts.scheme not in SCHEMES:
            raise sec.error(key, f"bad server URL {shown}: scheme must be nats:// or tls://")
        if not parts.hostname:
            raise sec.error(key, f"bad server URL {shown}: no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise sec.error(key, f"bad server URL {shown}: unexpected path or query")
        if port == 0:
            raise sec.error(key, f"bad server URL {shown}: port 0")
        return server_address(url)

    def auth(self, sec: _Section | None) -> AuthSettings | None:
        if sec is None:
            return None
        auth = AuthSettings(
            user=sec.text("user", None),
            password=sec.text("password", None, secret=True),
            password_file=sec.file("password_file"),
            token=sec.text("token", None, secret=True),
            token_file=sec.file("token_file"),
            nkeys_seed=sec.file("nkeys_seed"),
            credentials=sec.file("credentials"),
        )
        sec.done()
        pairs = (("password", "password_file"), ("token", "token_file"))
        for a, b in pairs:
            if getattr(auth, a) is not None and getattr(auth, b) is not None:
                raise sec.error(b, f"set either {a} or {b}, not both")
        has_password = auth.password is not None or auth.password_file is not None
        if has_password and auth.user is None:
            raise sec.error("user", "is required with a password")
        if auth.user is not None and not has_password:
            raise sec.error("password", "is required with user (or set password_file)")
        methods = [
            name
            for name, used in (
                ("user", auth.user is not None),
                ("token", auth.token is not None or auth.token_file is not None),
                ("nkeys_seed", auth.nkeys_seed is not None),
                ("credentials", auth.credentials is not None),
            )
            if used
        ]
        if len(methods) > 1:
            raise sec.error(methods[1], f"choose one auth method, not both {methods[0]} and {methods[1]}")
        if not methods:
            raise sec.error("", "names no auth method (user, token, nkeys_seed or credentials)")
        return auth

    def tls(self, sec: _Section | None) -> TlsSettings | None:
        if sec is None:
            return None
        tls = TlsSettings(ca=sec.file("ca"), cert=sec.file("cert"), key=sec.file("key"))
        sec.done()
        if (tls.cert is None) != (tls.key is None):
            raise sec.error("key" if tls.key is None else "cert", "cert and key go together (mutual TLS)")
        return tls

    # ---- source

    def source(self, sec: _Section) -> SourceSettings:
        connection = self.connection(sec, "asset-forwarder-source", owner=None)
        subject = sec.text("subject", "assets.>")
        check_subject(subject, wildcards=True, fail=lambda m: sec.error("subject", m))
        queue_group = sec.text("queue_group", "asset-forwarder", empty=True) or None
        if queue_group is not None and not SUBJECT_TOKEN_RE.match(queue_group):
            raise sec.error("queue_group", f"is not a valid queue group name: {queue_group!r}")
        js = sec.section("jetstream")
        source = SourceSettings(
            connection=connection,
            subject=subject,
            queue_group=queue_group,
            pending_msgs_limit=sec.number("pending_msgs_limit", 65536, integer=True, minimum=1),
            pending_bytes_limit=sec.number("pending_bytes_limit", 64 * 1024 * 1024, integer=True, minimum=1),
            jetstream=self.jetstream_source(js) if js is not None else None,
        )
        sec.done(CONNECTION_KEYS)
        return source

    def jetstream_source(self, sec: _Section) -> JetStreamSourceSettings:
        backoff = sec.raw("backoff", None)
        if backoff is None:
            delays: tuple[float, ...] = JetStreamSourceSettings.backoff
        else:
            if not isinstance(backoff, list) or not backoff:
                raise sec.error("backoff", f"must be a non-empty list of seconds, got {_type_name(backoff)}")
            sub = _Section(self, {f"backoff[{i}]": v for i, v in enumerate(backoff)}, sec.path)
            delays = tuple(sub.number(f"backoff[{i}]", exclusive_minimum=0) for i in range(len(backoff)))
        settings = JetStreamSourceSettings(
            stream=sec.text("stream"),
            durable=sec.text("durable", "asset-forwarder"),
            ack_wait=sec.number("ack_wait", 30.0, exclusive_minimum=0),
            max_ack_pending=sec.number("max_ack_pending", 20000, integer=True, minimum=1),
            max_deliver=sec.number("max_deliver", -1, integer=True, minimum=-1),
            backoff=delays,
            deliver_policy=sec.choice("deliver_policy", ("all", "new", "last", "last_per_subject"), "all"),
            idle_heartbeat=sec.number("idle_heartbeat", 5.0, exclusive_minimum=0),
            park_stream=sec.text("park_stream", "FORWARDER_PARKED", empty=True) or None,
            park_prefix=sec.text("park_prefix", "forwarder.parked"),
        )
        if settings.park_stream is not None and not SUBJECT_TOKEN_RE.match(settings.park_stream):
            raise sec.error("park_stream", f"is not a valid JetStream name: {settings.park_stream!r}")
        check_subject(settings.park_prefix, wildcards=False, fail=lambda m: sec.error("park_prefix", m))
        for name in ("stream", "durable"):
            if not SUBJECT_TOKEN_RE.match(getattr(settings, name)):
                raise sec.error(name, f"is not a valid JetStream name: {getattr(settings, name)!r}")
        if settings.max_deliver == 0:
            raise sec.error("max_deliver", "must be -1 (forever) or >= 1")
        sec.done()
        return settings

    # ---- routing

    def routing(self, sec: _Section, source: SourceSettings) -> RoutingSettings:
        key_sec = sec.section("key") or _Section(self, {"subject_token": 1}, sec.key("key"))
        key = self.key_settings(key_sec, source)
        template = sec.text("subject", "{subject}")
        check_template(template, source.subject, lambda m: sec.error("subject", m))
        hashing_sec = sec.section("hashing") or _Section(self, {}, sec.key("hashing"))
        hashing = HashingSettings(
            algorithm=hashing_sec.choice("algorithm", ("rendezvous", "openfactory"), "rendezvous"),
            replicas=hashing_sec.number("replicas", 128, integer=True, minimum=1),
        )
        if hashing.replicas > 100_000:
            raise hashing_sec.error("replicas", f"must be <= 100000, got {hashing.replicas}")
        hashing_sec.done()
        dead = sec.text("dead_letter_subject", "forwarder.dead")
        check_subject(dead, wildcards=False, fail=lambda m: sec.error("dead_letter_subject", m))
        routing = RoutingSettings(
            key=key,
            subject_template=template,
            hashing=hashing,
            dead_letter_subject=dead,
            cache_size=sec.number("cache_size", 262144, integer=True, minimum=1),
        )
        sec.done()
        return routing

    def key_settings(self, sec: _Section, source: SourceSettings) -> KeySettings:
        kinds = [k for k in ("subject_token", "header", "json_field") if k in sec.data]
        if len(kinds) != 1:
            raise sec.error("", "must set exactly one of subject_token, header, json_field")
        kind = kinds[0]
        if kind == "subject_token":
            index = sec.number("subject_token", integer=True, minimum=0)
            check_token_index(index, source.subject, lambda m: sec.error("subject_token", m), key=True)
            settings = KeySettings(kind="subject_token", token=index)
        elif kind == "header":
            name = sec.text("header")
            if not HEADER_NAME_RE.match(name):
                raise sec.error("header", f"is not a valid header name: {name!r}")
            settings = KeySettings(kind="header", header=name)
        else:
            settings = KeySettings(
                kind="json_field",
                field=sec.text("json_field"),
                max_json_bytes=sec.number("max_json_bytes", 65536, integer=True, minimum=1),
            )
        sec.done()
        return settings

    # ---- clusters

    def clusters(self, top: _Section) -> tuple[ClusterSettings, ...]:
        sec = top.section("clusters")
        if sec is not None and sec.data:
            return tuple(self.cluster(sec, name) for name in sec.data)
        from_env = self.clusters_from_env()
        if not from_env:
            raise ConfigError(
                self.shown,
                "clusters",
                f"no target clusters: define them here or set {ENV_CLUSTER_PREFIX}<NAME>=url1,url2",
            )
        return from_env

    def cluster(self, parent: _Section, name: Any) -> ClusterSettings:
        if not isinstance(name, str) or not CLUSTER_NAME_RE.match(name):
            raise parent.error(str(name), "cluster names are letters, digits, '_' and '-' (at most 64)")
        sec = _Section(self, parent.data[name], parent.key(name))
        parent.used.add(name)
        connection = self.connection(sec, f"asset-forwarder-{name}", owner=name)
        weight_set = sec.has("weight")
        js_raw = sec.raw("jetstream", False)
        jetstream: JetStreamTargetSettings | None
        if isinstance(js_raw, dict):
            js = _Section(self, js_raw, sec.key("jetstream"))
            jetstream = JetStreamTargetSettings(
                max_pending=js.number("max_pending", 4000, integer=True, minimum=1),
                ack_timeout=js.number("ack_timeout", 5.0, exclusive_minimum=0),
            )
            js.done()
        else:
            jetstream = JetStreamTargetSettings() if sec.flag("jetstream", False) else None
        cluster = ClusterSettings(
            name=name,
            connection=connection,
            weight=sec.number("weight", 1.0, exclusive_minimum=0),
            weight_set=weight_set,
            jetstream=jetstream,
        )
        sec.done(CONNECTION_KEYS)
        return cluster

    def clusters_from_env(self) -> tuple[ClusterSettings, ...]:
        clusters = []
        for var in sorted(self.env):
            if not var.startswith(ENV_CLUSTER_PREFIX) or not self.env[var].strip():
                continue
            name = var[len(ENV_CLUSTER_PREFIX) :]
            data = {name: {"servers": [u.strip() for u in self.env[var].split(",") if u.strip()]}}
            env_loader = _Loader(f"environment {var}", self.env)
            env_loader.server_owner = self.server_owner
            clusters.append(env_loader.cluster(_Section(env_loader, data, ""), name))
        return tuple(clusters)


# --------------------------------------------------------------------------- subjects


def check_subject(subject: str, *, wildcards: bool, fail: Callable[[str], ConfigError]) -> None:
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if not token:
            raise fail(f"subject {subject!r} has an empty token")
        if any(c.isspace() for c in token):
            raise fail(f"subject {subject!r} contains whitespace")
        if token in ("*", ">"):
            if not wildcards:
                raise fail(f"subject {subject!r} must not contain wildcards")
            if token == ">" and i != len(tokens) - 1:
                raise fail(f"subject {subject!r}: '>' must be the last token")
        elif "*" in token or ">" in token:
            raise fail(f"subject {subject!r}: wildcards must be whole tokens")


def check_token_index(index: int, subject: str, fail: Callable[[str], ConfigError], *, key: bool) -> None:
    """A token index must be able to exist in subjects that match the source subject."""
    tokens = subject.split(".")
    open_ended = tokens[-1] == ">"
    if not open_ended and index >= len(tokens):
        raise fail(f"token index {index} is out of range: subjects matching {subject!r} have {len(tokens)}")
    if key and index < len(tokens) and tokens[index] not in ("*", ">"):
        raise fail(
            f"token {index} of {subject!r} is the literal {tokens[index]!r}: every message would "
            "carry the same key; point at a wildcard token"
        )


def check_template(template: str, source_subject: str, fail: Callable[[str], ConfigError]) -> None:
    for m in TEMPLATE_FIELD_RE.finditer(template):
        name = m.group(1)
        if name in ("subject", "asset"):
            continue
        tm = re.fullmatch(r"token\[(\d+)\]", name)
        if tm is None:
            raise fail(
                f"unknown field {{{name}}} in {template!r}: use {{subject}}, {{asset}} or {{token[N]}}"
            )
        check_token_index(int(tm.group(1)), source_subject, fail, key=False)
    probe = TEMPLATE_FIELD_RE.sub("x", template)
    if "{" in probe or "}" in probe:
        raise fail(f"unbalanced braces in template {template!r}")
    check_subject(probe, wildcards=False, fail=fail)


# --------------------------------------------------------------------------- entry points


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None, *, require_files: bool = True
) -> Settings:
    """Load and validate a config file.

    ``require_files=False`` is for ``check-config``: files that the config names (a
    Kubernetes Secret mounted only in the pod) may be absent here; ``missing_files()``
    lists them. ``run`` requires them and names the first missing one.
    """
    shown = os.fspath(path)
    doc = _read_yaml(Path(shown), shown)
    return load_config_mapping(doc, shown, env, require_files=require_files)


def load_config_mapping(
    doc: Any, shown: str, env: Mapping[str, str] | None = None, *, require_files: bool = True
) -> Settings:
    """Validate a config document that is already parsed (``shown`` names it in errors).

    The asset client builds one from environment variables; ``load_config`` reads a file.
    """
    env = os.environ if env is None else env
    if not isinstance(doc, dict):
        raise ConfigError(shown, "", f"the document must be a mapping of sections, got {_type_name(doc)}")
    settings = _Loader(shown, env).settings(doc)
    if require_files:
        for ref in settings.missing_files():
            raise ConfigError(shown, ref.key, f"cannot read file {ref.path!r}")
    return settings


def connection_secrets(conn: ConnectionSettings) -> list[str]:
    """Secret values written in one connection's settings: auth values and URL userinfo."""
    out: list[str] = []
    if conn.auth is not None:
        out += [s.reveal() for s in (conn.auth.password, conn.auth.token) if s is not None]
    for url in conn.servers:
        userinfo = url.partition("://")[2].rpartition("@")[0]
        out += [part for part in userinfo.split(":") if part]
    return out


def iter_connections(settings: Settings) -> Iterator[tuple[str, ConnectionSettings]]:
    """('source', ...) then each cluster by name: for code that treats them alike."""
    yield "source", settings.source.connection
    for cluster in settings.clusters:
        yield cluster.name, cluster.connection
