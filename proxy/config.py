"""YAML configuration, validated into frozen dataclasses.

Every problem is collected with its key path (``switches[1].port: ...``) and reported at
once by `ConfigError`, so an operator fixes a file in one pass. Readers always return a
value of the right type (the default, or a placeholder, after recording a problem); a
config with any problem is never returned.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from codec import SENSITIVE_FIELDS, FrameFormat, LengthPrefix, Spec, SpecError, load_spec
from proxy.errors import ConfigError

T = TypeVar("T")

STRATEGIES = ("round_robin", "weighted", "least_latency")
DEFAULT_MATCH_KEY = ("41", "11")
DEFAULT_KEY_FIELDS = ("32", "41", "11", "37", "7")
ON_CONFLICT = ("rc94", "replay")
# Answers to a reversal that mean the switch has dealt with it: done, nothing to reverse,
# not a transaction it can reverse, already had it.
ACK_RCS = ("00", "25", "12", "94")
# Response codes that mean approved (in full, in part, or with identification).
APPROVAL_RCS = frozenset({"00", "08", "10", "11", "16", "85"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Fields the proxy reads or writes itself: MTI, bitmap, STAN, RC, terminal, NMI code.
REQUIRED_FIELDS = ("t", "p", "11", "39", "41", "70")
_NO_SPEC: Spec = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How one side of the proxy frames and encodes messages."""

    framing: FrameFormat
    spec_ref: str
    spec: Spec = field(repr=False, compare=False)


TLS_VERSIONS = ("1.2", "1.3")
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ServerTls:
    """TLS on the terminal listener; with `client_ca`, mutual TLS (a client certificate
    signed by that CA is required)."""

    cert: Path
    key: Path
    client_ca: Path | None
    min_version: str
    handshake_timeout: float


@dataclass(frozen=True, slots=True)
class ClientTls:
    """TLS on the links to a switch: its chain verified against `ca` (None: the system's
    trust store) and its host name against `server_name`; `cert`/`key` when it asks for a
    client certificate."""

    ca: Path | None
    cert: Path | None
    key: Path | None
    server_name: str
    min_version: str


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str
    port: int
    endpoint: Endpoint
    tls: ServerTls | None
    max_connections: int
    max_connections_per_ip: int
    max_inflight_per_connection: int
    idle_timeout: float
    frame_timeout: float
    write_timeout: float
    shutdown_grace: float


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: `tps` tokens a second, at most `burst` saved up."""

    tps: float
    burst: int


@dataclass(frozen=True, slots=True)
class ClientProfile:
    """Who a client is (source networks and/or certificate name) and what it may send.

    `allow` lists request MTIs (a repeat is allowed with its original); None allows any.
    """

    name: str
    networks: tuple[Network, ...]
    cert_cn: str | None
    allow: frozenset[str] | None
    rate: RateLimit | None
    rate_rc: str


@dataclass(frozen=True, slots=True)
class ReconnectConfig:
    initial_delay: float
    max_delay: float


@dataclass(frozen=True, slots=True)
class SwitchConfig:
    name: str
    host: str
    port: int
    connections: int
    timeout: float
    endpoint: Endpoint
    tpdu: bytes | None
    max_inflight: int
    connect_timeout: float
    reconnect: ReconnectConfig
    weight: int
    sign_on: bool
    enabled: bool
    tls: ClientTls | None


@dataclass(frozen=True, slots=True)
class HealthConfig:
    echo_interval: float
    echo_timeout: float
    rise_interval: float
    fall: int
    rise: int
    timeout_threshold: int


@dataclass(frozen=True, slots=True)
class StoreConfig:
    enabled: bool
    dsn: str | None = field(repr=False)  # may hold a password
    schema: str | None
    timeout: float
    pool_size: int
    batch_max: int
    batch_wait_ms: float
    data_dir: str


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    key_fields: tuple[str, ...]
    on_conflict: str
    pan_hash: bool


@dataclass(frozen=True, slots=True)
class ReversalConfig:
    message: str
    max_attempts: int
    backoff_initial: float
    backoff_max: float
    on_undelivered: bool
    timeout_rc: str
    acknowledge_rcs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    strategy: str
    match_key: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AdminConfig:
    enabled: bool
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str
    format: str


@dataclass(frozen=True, slots=True)
class Config:
    listen: ListenConfig
    clients: tuple[ClientProfile, ...]
    switches: tuple[SwitchConfig, ...]
    health: HealthConfig
    routing: RoutingConfig
    store: StoreConfig
    idempotency: IdempotencyConfig
    reversal: ReversalConfig
    admin: AdminConfig
    log: LogConfig


class _Reader:
    """Walks raw YAML values, collecting problems instead of stopping at the first."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []
        # One object per spec named: endpoints that share a spec share it, so a message
        # decoded on one side passes to the other as its bytes (see codec.Message.wire).
        self._specs: dict[str, Spec] = {}

    def fail(self, path: str, problem: str) -> None:
        self.problems.append(f"{path}: {problem}")

    def mapping(self, raw: object, path: str, known: tuple[str, ...]) -> Mapping[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            self.fail(path, f"must be a mapping, got {_kind(raw)}")
            return {}
        for key in raw:
            if key not in known:
                self.fail(_join(path, str(key)), f"unknown key (known: {', '.join(known)})")
        return raw

    def value(
        self,
        raw: Mapping[str, Any],
        path: str,
        key: str,
        default: T,
        check: Callable[[T], str | None] | None = None,
        *,
        required: bool = False,
    ) -> T:
        """`raw[key]`, of the default's type; the default after recording any problem."""
        where = _join(path, key)
        if key not in raw or raw[key] is None:
            if required:
                self.fail(where, "is required")
            return default
        kind = type(default)
        value = raw[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            self.fail(where, f"must be {kind.__name__}, got {_kind(value)}")
            return default
        if check is not None and (problem := check(value)) is not None:
            self.fail(where, problem)
            return default
        return value

    def unique_names(self, names: list[str], path: str, what: str) -> None:
        seen: set[str] = set()
        for index, name in enumerate(names):
            if name in seen:
                self.fail(f"{path}[{index}].name", f"duplicate {what} name {name!r}")
            seen.add(name)

    def file(self, raw: Mapping[str, Any], path: str, key: str, *, required: bool = False) -> Path:
        """A readable file named by `raw[key]`, relative to the config file's folder."""
        name = self.value(raw, path, key, "", required=required)
        where = self.base_dir / name
        if name and not where.is_file():
            self.fail(_join(path, key), f"no such file: {where}")
        return where

    def endpoint(self, raw: Mapping[str, Any], path: str, tpdu: bool) -> Endpoint:
        framing = LengthPrefix(self.value(raw, path, "framing", "binary2", _one_of(LengthPrefix)))
        max_frame = self.value(raw, path, "max_frame", 8192, _between(16, framing.max_length))
        spec_ref = self.value(raw, path, "spec", "default")
        spec = self._specs.get(spec_ref, _NO_SPEC)
        if spec is _NO_SPEC:
            try:
                spec = self._specs[spec_ref] = load_spec(spec_ref, base_dir=self.base_dir)
            except SpecError as exc:
                self.fail(_join(path, "spec"), str(exc))
        if spec and (missing := [f for f in REQUIRED_FIELDS if f not in spec]):
            self.fail(_join(path, "spec"), f"must define fields {', '.join(missing)}")
        return Endpoint(FrameFormat(framing, tpdu, max_frame), spec_ref, spec)


def load_config(path: Path) -> Config:
    """Read and validate a YAML config file; raise `ConfigError` listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"{path}: invalid YAML{where}"]) from None
    return parse_config(raw, base_dir=path.parent)


def parse_config(raw: object, *, base_dir: Path) -> Config:
    """Validate an already-parsed YAML document."""
    reader = _Reader(base_dir)
    top = reader.mapping(
        raw,
        "config",
        (
            "listen",
            "clients",
            "switches",
            "health",
            "routing",
            "store",
            "idempotency",
            "reversal",
            "admin",
            "log",
        ),
    )
    config = Config(
        listen=_listen(reader, top.get("listen")),
        clients=_clients(reader, top.get("clients")),
        switches=_switches(reader, top.get("switches")),
        health=_health(reader, top.get("health")),
        routing=_routing(reader, top.get("routing")),
        store=_store(reader, top.get("store")),
        idempotency=_idempotency(reader, top.get("idempotency")),
        reversal=_reversal(reader, top.get("reversal")),
        admin=_admin(reader, top.get("admin")),
        log=_log(reader, top.get("log")),
    )
    endpoints = {"listen": config.listen.endpoint} | {
        f"switches[{i}]": s.endpoint for i, s in enumerate(config.switches)
    }
    extra_key_fields = [f for f in config.routing.match_key if f not in REQUIRED_FIELDS]
    for path, endpoint in endpoints.items():
        if endpoint.spec and (missing := [f for f in extra_key_fields if f not in endpoint.spec]):
            reader.fail(f"{path}.spec", f"lacks match_key field(s) {', '.join(missing)}")
    if config.switches and not any(s.enabled for s in config.switches):
        reader.fail("switches", "at least one switch must be enabled")
    mutual = config.listen.tls is not None and config.listen.tls.client_ca is not None
    for index, profile in enumerate(config.clients):
        if profile.cert_cn is not None and not mutual:
            reader.fail(f"clients[{index}].cert_cn", "needs mutual TLS (listen.tls.client_ca)")
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


def _listen(reader: _Reader, raw_value: object) -> ListenConfig:
    path = "listen"
    raw = reader.mapping(
        raw_value,
        path,
        (
            "host", "port", "framing", "tpdu", "spec", "max_frame", "tls", "max_connections",
            "max_connections_per_ip", "max_inflight_per_connection", "idle_timeout",
            "frame_timeout", "write_timeout", "shutdown_grace",
        ),
    )  # fmt: skip
    return ListenConfig(
        host=reader.value(raw, path, "host", "0.0.0.0", _host),  # noqa: S104 - a proxy listens
        port=reader.value(raw, path, "port", 6000, _between(0, 65535)),
        endpoint=reader.endpoint(raw, path, reader.value(raw, path, "tpdu", False)),
        tls=_server_tls(reader, raw.get("tls"), _join(path, "tls")),
        max_connections=reader.value(raw, path, "max_connections", 1000, _between(1, 100_000)),
        max_connections_per_ip=reader.value(
            raw, path, "max_connections_per_ip", 200, _between(1, 100_000)
        ),
        max_inflight_per_connection=reader.value(
            raw, path, "max_inflight_per_connection", 64, _between(1, 10_000)
        ),
        idle_timeout=reader.value(raw, path, "idle_timeout", 300.0, _positive(86_400)),
        frame_timeout=reader.value(raw, path, "frame_timeout", 10.0, _positive(600)),
        write_timeout=reader.value(raw, path, "write_timeout", 10.0, _positive(300)),
        shutdown_grace=reader.value(raw, path, "shutdown_grace", 10.0, _positive(600)),
    )


def _server_tls(reader: _Reader, raw_value: object, path: str) -> ServerTls | None:
    if raw_value is None:
        return None
    raw = reader.mapping(
        raw_value, path, ("cert", "key", "client_ca", "min_version", "handshake_timeout")
    )
    client_ca = reader.value(raw, path, "client_ca", "")
    return ServerTls(
        cert=reader.file(raw, path, "cert", required=True),
        key=reader.file(raw, path, "key", required=True),
        client_ca=reader.file(raw, path, "client_ca") if client_ca else None,
        min_version=reader.value(raw, path, "min_version", "1.2", _one_of(TLS_VERSIONS)),
        handshake_timeout=reader.value(raw, path, "handshake_timeout", 5.0, _positive(120)),
    )


def _client_tls(reader: _Reader, raw_value: object, path: str, host: str) -> ClientTls | None:
    if raw_value is None:
        return None
    raw = reader.mapping(raw_value, path, ("ca", "cert", "key", "server_name", "min_version"))
    present = {key: bool(reader.value(raw, path, key, "")) for key in ("ca", "cert", "key")}
    if present["cert"] != present["key"]:
        reader.fail(path, "cert and key go together")
    return ClientTls(
        ca=reader.file(raw, path, "ca") if present["ca"] else None,
        cert=reader.file(raw, path, "cert") if present["cert"] else None,
        key=reader.file(raw, path, "key") if present["key"] else None,
        server_name=reader.value(raw, path, "server_name", host, _host),
        min_version=reader.value(raw, path, "min_version", "1.2", _one_of(TLS_VERSIONS)),
    )


def _clients(reader: _Reader, raw: object) -> tuple[ClientProfile, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        reader.fail("clients", "must be a list of client profiles")
        return ()
    profiles = tuple(_client(reader, item, f"clients[{i}]") for i, item in enumerate(raw))
    reader.unique_names([p.name for p in profiles], "clients", "profile")
    return profiles


def _client(reader: _Reader, raw_value: object, path: str) -> ClientProfile:
    raw = reader.mapping(
        raw_value, path, ("name", "networks", "cert_cn", "allow", "rate", "rate_rc")
    )
    networks = tuple(_networks(reader, reader.value(raw, path, "networks", []), path))
    cert_cn = reader.value(raw, path, "cert_cn", "").casefold() or None
    if not networks and cert_cn is None:
        reader.fail(path, "needs networks, cert_cn or both (with neither it takes everyone)")
    allow: list[Any] = reader.value(raw, path, "allow", [], _request_mtis)
    if "allow" in raw and raw["allow"] is not None and not allow:
        reader.fail(_join(path, "allow"), "must list at least one MTI (leave it out: any)")
    return ClientProfile(
        name=reader.value(raw, path, "name", "", _name, required=True),
        networks=networks,
        cert_cn=cert_cn,
        allow=frozenset(str(mti) for mti in allow) if allow else None,
        rate=_rate(reader, raw.get("rate"), _join(path, "rate")),
        rate_rc=reader.value(raw, path, "rate_rc", "91", _refusal_rc),
    )


def _networks(reader: _Reader, values: list[Any], path: str) -> list[Network]:
    networks = []
    for index, value in enumerate(values):
        where = f"{path}.networks[{index}]"
        try:
            network = ipaddress.ip_network(str(value))
        except ValueError:
            reader.fail(
                where, "must be an address or network with its host bits zero, e.g. 10.0.0.0/8"
            )
            continue
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
            reader.fail(where, "write IPv4-mapped networks as IPv4 (clients are matched so)")
            continue
        networks.append(network)
    return networks


def _rate(reader: _Reader, raw_value: object, path: str) -> RateLimit | None:
    if raw_value is None:
        return None
    raw = reader.mapping(raw_value, path, ("tps", "burst"))
    tps = reader.value(raw, path, "tps", 1.0, _positive(1_000_000), required=True)
    return RateLimit(
        tps=tps, burst=reader.value(raw, path, "burst", max(1, round(tps)), _between(1, 10**6))
    )


def _switches(reader: _Reader, raw: object) -> tuple[SwitchConfig, ...]:
    if not isinstance(raw, list) or not raw:
        reader.fail("switches", "must be a non-empty list of switches")
        return ()
    switches = tuple(_switch(reader, item, f"switches[{i}]") for i, item in enumerate(raw))
    reader.unique_names([s.name for s in switches], "switches", "switch")
    return switches


def _switch(reader: _Reader, raw_value: object, path: str) -> SwitchConfig:
    raw = reader.mapping(
        raw_value,
        path,
        (
            "name", "host", "port", "connections", "timeout", "framing", "tpdu", "spec",
            "max_frame", "max_inflight", "connect_timeout", "reconnect", "weight", "sign_on",
            "enabled", "tls",
        ),
    )  # fmt: skip
    tpdu = reader.value(raw, path, "tpdu", "", _tpdu)
    host = reader.value(raw, path, "host", "", _host, required=True)
    return SwitchConfig(
        name=reader.value(raw, path, "name", "", _name, required=True),
        host=host,
        port=reader.value(raw, path, "port", 0, _between(1, 65535), required=True),
        connections=reader.value(raw, path, "connections", 1, _between(1, 64)),
        timeout=reader.value(raw, path, "timeout", 20.0, _positive(120)),
        endpoint=reader.endpoint(raw, path, bool(tpdu)),
        tpdu=bytes.fromhex(tpdu) if tpdu else None,
        max_inflight=reader.value(raw, path, "max_inflight", 1000, _between(1, 100_000)),
        connect_timeout=reader.value(raw, path, "connect_timeout", 5.0, _positive(120)),
        reconnect=_reconnect(reader, raw.get("reconnect"), _join(path, "reconnect")),
        weight=reader.value(raw, path, "weight", 1, _between(1, 1000)),
        sign_on=reader.value(raw, path, "sign_on", False),
        enabled=reader.value(raw, path, "enabled", True),
        tls=_client_tls(reader, raw.get("tls"), _join(path, "tls"), host),
    )


def _reconnect(reader: _Reader, raw_value: object, path: str) -> ReconnectConfig:
    raw = reader.mapping(raw_value, path, ("initial_delay", "max_delay"))
    initial = reader.value(raw, path, "initial_delay", 0.5, _positive(60))
    maximum = reader.value(raw, path, "max_delay", 30.0, _positive(3600))
    if maximum < initial:
        reader.fail(_join(path, "max_delay"), "must be >= initial_delay")
    return ReconnectConfig(initial, maximum)


def _health(reader: _Reader, raw_value: object) -> HealthConfig:
    path = "health"
    raw = reader.mapping(
        raw_value,
        path,
        ("echo_interval", "echo_timeout", "rise_interval", "fall", "rise", "timeout_threshold"),
    )
    health = HealthConfig(
        echo_interval=reader.value(raw, path, "echo_interval", 10.0, _positive(3600)),
        echo_timeout=reader.value(raw, path, "echo_timeout", 3.0, _positive(600)),
        rise_interval=reader.value(raw, path, "rise_interval", 1.0, _positive(3600)),
        fall=reader.value(raw, path, "fall", 3, _between(1, 100)),
        rise=reader.value(raw, path, "rise", 2, _between(1, 100)),
        timeout_threshold=reader.value(raw, path, "timeout_threshold", 5, _between(1, 10_000)),
    )
    if health.echo_timeout > health.echo_interval:
        reader.fail(_join(path, "echo_timeout"), "must not exceed echo_interval")
    return health


def _routing(reader: _Reader, raw_value: object) -> RoutingConfig:
    path = "routing"
    raw = reader.mapping(raw_value, path, ("strategy", "match_key"))
    match_key = reader.value(raw, path, "match_key", list(DEFAULT_MATCH_KEY), _key_field_list)
    return RoutingConfig(
        strategy=reader.value(raw, path, "strategy", "round_robin", _one_of(STRATEGIES)),
        match_key=tuple(_field_names(match_key)),
    )


def _store(reader: _Reader, raw_value: object) -> StoreConfig:
    path = "store"
    raw = reader.mapping(
        raw_value,
        path,
        (
            "enabled", "dsn", "schema", "timeout", "pool_size", "batch_max", "batch_wait_ms",
            "data_dir",
        ),
    )  # fmt: skip
    return StoreConfig(
        enabled=reader.value(raw, path, "enabled", True),
        dsn=reader.value(raw, path, "dsn", "") or None,
        schema=reader.value(raw, path, "schema", "", _identifier) or None,
        timeout=reader.value(raw, path, "timeout", 2.0, _positive(60)),
        pool_size=reader.value(raw, path, "pool_size", 8, _between(1, 100)),
        batch_max=reader.value(raw, path, "batch_max", 256, _between(1, 10_000)),
        batch_wait_ms=reader.value(raw, path, "batch_wait_ms", 0.0, _at_most(1000)),
        data_dir=reader.value(raw, path, "data_dir", ".iso-proxy/pg"),
    )


def _idempotency(reader: _Reader, raw_value: object) -> IdempotencyConfig:
    path = "idempotency"
    raw = reader.mapping(raw_value, path, ("key_fields", "on_conflict", "pan_hash"))
    key_fields = reader.value(raw, path, "key_fields", list(DEFAULT_KEY_FIELDS), _key_field_list)
    return IdempotencyConfig(
        key_fields=tuple(_field_names(key_fields)),
        on_conflict=reader.value(raw, path, "on_conflict", "rc94", _one_of(ON_CONFLICT)),
        pan_hash=reader.value(raw, path, "pan_hash", True),
    )


def _reversal(reader: _Reader, raw_value: object) -> ReversalConfig:
    path = "reversal"
    raw = reader.mapping(
        raw_value,
        path,
        (
            "message",
            "max_attempts",
            "backoff_initial",
            "backoff_max",
            "on_undelivered",
            "timeout_rc",
            "acknowledge_rcs",
        ),
    )
    reversal = ReversalConfig(
        message=reader.value(raw, path, "message", "0400", _one_of(("0400", "0420"))),
        max_attempts=reader.value(raw, path, "max_attempts", 10, _between(1, 1000)),
        backoff_initial=reader.value(raw, path, "backoff_initial", 1.0, _positive(3600)),
        backoff_max=reader.value(raw, path, "backoff_max", 60.0, _positive(86_400)),
        on_undelivered=reader.value(raw, path, "on_undelivered", True),
        timeout_rc=reader.value(raw, path, "timeout_rc", "91", _one_of(("91", "68"))),
        acknowledge_rcs=tuple(
            str(rc) for rc in reader.value(raw, path, "acknowledge_rcs", list(ACK_RCS), _rcs)
        ),
    )
    if reversal.backoff_max < reversal.backoff_initial:
        reader.fail(_join(path, "backoff_max"), "must be >= backoff_initial")
    return reversal


def _admin(reader: _Reader, raw_value: object) -> AdminConfig:
    raw = reader.mapping(raw_value, "admin", ("enabled", "host", "port"))
    return AdminConfig(
        enabled=reader.value(raw, "admin", "enabled", True),
        host=reader.value(raw, "admin", "host", "127.0.0.1", _host),
        port=reader.value(raw, "admin", "port", 9100, _between(0, 65535)),
    )


def _log(reader: _Reader, raw_value: object) -> LogConfig:
    raw = reader.mapping(raw_value, "log", ("level", "format"))
    return LogConfig(
        level=reader.value(raw, "log", "level", "INFO", _one_of(LOG_LEVELS)),
        format=reader.value(raw, "log", "format", "text", _one_of(("text", "json"))),
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _between(low: int, high: int) -> Callable[[int], str | None]:
    def check(value: int) -> str | None:
        return None if low <= value <= high else f"must be between {low} and {high}"

    return check


def _positive(high: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        return None if 0 < value <= high else f"must be > 0 and <= {high:g}"

    return check


def _at_most(high: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        return None if 0 <= value <= high else f"must be >= 0 and <= {high:g}"

    return check


def _one_of(choices: Any) -> Callable[[str], str | None]:
    allowed = [str(c) for c in choices]

    def check(value: str) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(allowed)}"

    return check


def _name(value: str) -> str | None:
    ok = value and len(value) <= 64 and all(c.isalnum() or c in "-_." for c in value)
    return None if ok else "must be 1-64 letters, digits, '-', '_' or '.'"


def _host(value: str) -> str | None:
    if not value:
        return "must not be empty"
    try:
        ipaddress.ip_address(value)
    except ValueError:
        labels = value.rstrip(".").split(".")
        if not all(
            label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels
        ):
            return "must be an IP address or a host name"
    return None


def _tpdu(value: str) -> str | None:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b"?"
    return None if len(raw) in (0, 5) else "must be 10 hex digits (5 bytes), e.g. '6000010000'"


def _key_field_list(value: list[Any]) -> str | None:
    """Fields that identify a request: 41 and 11 at least, never card data."""
    if any(not str(f).isdigit() or not 2 <= int(str(f)) <= 128 for f in value):
        return "fields must be data field numbers 2-128"
    fields = _field_names(value)
    if len(set(fields)) != len(fields):
        return "must not repeat a field"
    if not {"11", "41"} <= set(fields):
        return "must include 41 (terminal) and 11 (STAN): a STAN is unique per terminal only"
    if card_data := sorted(set(fields) & SENSITIVE_FIELDS, key=int):
        return f"must not use card data fields ({', '.join(card_data)})"
    return None


def _refusal_rc(value: str) -> str | None:
    if not (len(value) == 2 and value.isalnum()):
        return "must be a 2-character response code"
    if value in APPROVAL_RCS:
        return f"must not be an approval ({value}): the request is never forwarded"
    return None


def _request_mtis(value: list[Any]) -> str | None:
    """Request MTIs (function 0 or 2, not a repeat: repeats follow their original)."""
    for mti in value:
        text = str(mti)
        if not (isinstance(mti, str) and len(text) == 4 and text.isdigit()):
            return 'must list MTIs as quoted 4-digit strings, e.g. ["0200", "0420"]'
        if text[2] not in "02" or int(text[3]) % 2:
            return f"{text} is not an original request MTI (repeats follow their original)"
    return None


def _rcs(value: list[Any]) -> str | None:
    ok = value and all(isinstance(rc, str) and len(rc) == 2 and rc.isalnum() for rc in value)
    return None if ok else 'must be a list of 2-character response codes, e.g. ["00", "25"]'


def _identifier(value: str) -> str | None:
    ok = (
        value
        and len(value) <= 63
        and value.replace("_", "a").isalnum()
        and value.isascii()
        and value == value.lower()
        and not value[0].isdigit()
    )
    return None if ok else "must be a plain SQL identifier (lowercase letters, digits, '_')"


def _field_names(value: list[Any]) -> list[str]:
    """Field numbers as the codec names them: "041" and 41 are both "41"."""
    return [str(int(str(f))) for f in value]
