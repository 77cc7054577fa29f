"""The wire contract services speak (JSON), with its validation rules.

Inbound ingress messages are decoded with ``parse_*`` functions that either
return a typed message or raise ``WireError`` with a stable ``code`` and a
reason a sender can act on. Pure functions over bytes: no I/O.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from events.names import NAME_PATTERN
from events.vocab import Health, HealthStatus

Name = Annotated[str, msgspec.Meta(pattern=f"^{NAME_PATTERN}$")]
Host = Annotated[
    str, msgspec.Meta(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9][A-Za-z0-9.:%\[\]-]*$")
]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Version = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[A-Za-z0-9._+-]*$")]
Protocol = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9+.-]{0,15}$")]
HealthEndpoint = Annotated[str, msgspec.Meta(max_length=256, pattern=r"^/[\x21-\x7e]*$")]
Transport = Literal["nats", "kafka", "http", "grpc"]
Interval = Annotated[float, msgspec.Meta(gt=0, le=3600)]
Load = Annotated[float, msgspec.Meta(ge=0)]
MetaKey = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
MetaValue = str | Int64 | float | bool | None
SeqNo = Annotated[int, msgspec.Meta(ge=0)]
CorrelationId = Annotated[str, msgspec.Meta(max_length=128)]


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class WireError(ValueError):
    """Input that does not meet the wire contract.

    Attributes:
        code: stable machine-readable reason (``MALFORMED_JSON``, ``INVALID_FIELD``, ...).
        reason: human-readable explanation naming the offending field.
    """

    def __init__(self, code: str, reason: str) -> None:
        # A reason may quote the sender's text (msgspec names an unknown field or a bad
        # enum value): control characters are escaped, so it is printable text anywhere.
        reason = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", reason)
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class RegisterMessage(msgspec.Struct, kw_only=True, frozen=True):
    """``hub.register``: only service_name, host and port are required."""

    service_name: Name
    host: Host
    port: Port
    instance_id: Name | None = None
    protocol: Protocol = "http"
    version: Version = ""
    health_endpoint: HealthEndpoint = "/health"
    metadata: dict[MetaKey, MetaValue] = {}
    transport_preferences: Annotated[list[Transport], msgspec.Meta(max_length=8)] = []
    heartbeat_interval_s: Interval = 10.0
    depends_on: Annotated[list[Name], msgspec.Meta(max_length=64)] = []
    # The lease: no heartbeat for ttl_s -> critical (default 3 x interval); critical
    # for expire_after_s -> expired (default: the hub's HUB_EXPIRE_AFTER_S).
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=3 * 3600)] | None = None
    expire_after_s: Annotated[float, msgspec.Meta(gt=0, le=7 * 24 * 3600)] | None = None


class HeartbeatMessage(msgspec.Struct, kw_only=True, frozen=True):
    """``hub.heartbeat``: the instance's own view of its health."""

    service_name: Name
    instance_id: Name
    status: HealthStatus = Health.HEALTHY.value
    load: Load | None = None
    checks: dict[MetaKey, Any] = {}


class DeregisterMessage(msgspec.Struct, kw_only=True, frozen=True):
    """``hub.deregister``."""

    service_name: Name
    instance_id: Name


IngressMessage = RegisterMessage | HeartbeatMessage | DeregisterMessage

_KIND_TYPES: dict[str, type[IngressMessage]] = {
    "register": RegisterMessage,
    "heartbeat": HeartbeatMessage,
    "deregister": DeregisterMessage,
}
_decoders = {kind: msgspec.json.Decoder(t) for kind, t in _KIND_TYPES.items()}
_encoder = msgspec.json.Encoder()

INGRESS_KINDS = tuple(_KIND_TYPES)


def _unstorable(value: Any, path: str) -> str | None:
    """Why a free-form value (``metadata``, ``checks``) cannot be kept, naming the path
    of the first offending key or value; None if it can.

    JSON allows ``\\u0000`` but PostgreSQL text and jsonb do not; and JSON integers
    have no size, but the hub's pipe to its views (MessagePack) and most consumers hold
    64 bits at most. Refusing either at the door keeps a poison event out of the log.
    """
    if isinstance(value, str):
        return f"NUL character not allowed - at `{path}`" if "\x00" in value else None
    if isinstance(value, int) and not isinstance(value, bool):
        if INT64_MIN <= value <= INT64_MAX:
            return None
        return f"integer out of range (64 bits) - at `{path}`"
    if isinstance(value, dict):
        for k, v in value.items():
            if "\x00" in k:
                return f"NUL character not allowed - at `{path}` (a key)"
            found = _unstorable(v, f"{path}.{k}")
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _unstorable(v, f"{path}[{i}]")
            if found:
                return found
    return None


def check_utf8(payload: bytes) -> None:
    """JSON is UTF-8 (RFC 8259): refuse anything else before decoding, keys included.

    Python's strict decoder also refuses overlong forms and encoded surrogates. The
    decoders below would otherwise meet bad bytes only inside the strings they read
    (and raise ``UnicodeDecodeError`` there), and skip unknown keys unchecked.

    Raises:
        WireError: ``MALFORMED_UTF8``, naming the first bad byte.
    """
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = payload[exc.start : min(exc.end, exc.start + 4)].hex(" ")
        raise WireError(
            "MALFORMED_UTF8", f"not valid UTF-8 at byte {exc.start} ({bad}): {exc.reason}"
        ) from None


# Nesting of arrays and objects in an ingress message, its outermost object included.
MAX_DEPTH = 64
_STRUCTURE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)


def check_depth(payload: bytes) -> None:
    """Refuse JSON nested deeper than ``MAX_DEPTH`` levels, decided by the bytes alone.

    msgspec gives up at Python's recursion limit (``RecursionError``), which depends on
    how deep the caller's stack already is: the same message, accepted by the ingest
    loop, could then fail to encode when appended, or to decode where the log is read.

    Raises:
        WireError: ``MALFORMED_JSON``, naming the byte where the limit is passed.
    """
    if payload.count(b"[") + payload.count(b"{") <= MAX_DEPTH:
        return
    depth = 0
    for m in _STRUCTURE.finditer(payload):
        token = m.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                raise WireError(
                    "MALFORMED_JSON", f"nested deeper than {MAX_DEPTH} levels (at byte {m.start()})"
                )
        elif token in (b"]", b"}"):
            depth -= 1


def _decode(kind: str, payload: bytes) -> IngressMessage:
    check_utf8(payload)
    check_depth(payload)
    try:
        return _decoders[kind].decode(payload)
    except msgspec.ValidationError as exc:
        raise WireError("INVALID_FIELD", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise WireError("MALFORMED_JSON", str(exc)) from None


def parse_ingress(kind: str, payload: bytes, *, max_metadata_bytes: int) -> IngressMessage:
    """Decode and validate one ingress message of ``kind`` (register/heartbeat/deregister).

    Raises:
        WireError: the payload breaks the contract; ``code`` says how.
    """
    if kind not in _decoders:
        raise WireError("UNKNOWN_SUBJECT", f"no ingress message kind {kind!r}")
    if not payload.strip():
        raise WireError("MALFORMED_JSON", "empty payload")
    msg = _decode(kind, payload)
    if isinstance(msg, RegisterMessage):
        problem = _unstorable(msg.metadata, "$.metadata")
    elif isinstance(msg, HeartbeatMessage):
        problem = _unstorable(msg.checks, "$.checks")
    else:
        problem = None
    if problem is not None:
        raise WireError("INVALID_FIELD", problem)
    if isinstance(msg, RegisterMessage):
        if msg.ttl_s is not None and msg.ttl_s < msg.heartbeat_interval_s:
            raise WireError(
                "INVALID_FIELD",
                f"ttl_s ({msg.ttl_s}) is shorter than heartbeat_interval_s "
                f"({msg.heartbeat_interval_s}): every instance would lapse between heartbeats"
                " - at `$.ttl_s`",
            )
        size = len(_encoder.encode(msg.metadata))
        if size > max_metadata_bytes:
            raise WireError(
                "METADATA_TOO_LARGE",
                f"metadata is {size} bytes encoded, limit is {max_metadata_bytes}"
                " - at `$.metadata`",
            )
    elif isinstance(msg, HeartbeatMessage):
        size = len(_encoder.encode(msg.checks))
        if size > max_metadata_bytes:
            raise WireError(
                "METADATA_TOO_LARGE",
                f"checks is {size} bytes encoded, limit is {max_metadata_bytes} - at `$.checks`",
            )
    return msg


# --- queries (request-reply) ---------------------------------------------------------


class ServicesQuery(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``hub.query.services``: every filter optional; unknown fields are an error.

    Replies are paged by instance: at most ``limit`` instances (fewer if the reply
    would exceed the NATS max payload); ``metadata.next_cursor`` in the reply is
    the ``cursor`` of the next page, null on the last one.
    """

    name: Name | None = None
    status: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    version: Version | None = None
    min_seq: SeqNo | None = None
    correlation_id: CorrelationId | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 1000
    cursor: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class ServiceQuery(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``hub.query.service``: one service with its instances (paged like services)."""

    service_name: Name
    min_seq: SeqNo | None = None
    correlation_id: CorrelationId | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 1000
    cursor: Annotated[str, msgspec.Meta(max_length=200)] | None = None


PickStrategy = Literal["round_robin", "random", "least_load"]


class InstancesQuery(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``hub.query.instances``: discovery of one service's instances.

    ``healthy_only`` keeps instances whose health is ``healthy`` and that are not
    flapping (during self-preservation also the at-risk ones, marked ``at_risk``);
    ``pick`` returns one instance chosen by the strategy; ``version`` and
    ``metadata`` (every given key must be equal) filter.
    """

    service_name: Name
    healthy_only: bool = False
    pick: PickStrategy | None = None
    version: Version | None = None
    metadata: Annotated[dict[MetaKey, MetaValue], msgspec.Meta(max_length=32)] = {}
    min_seq: SeqNo | None = None
    correlation_id: CorrelationId | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 1000
    cursor: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class HealthQuery(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``hub.query.health``: per-service and overall health (one service if named)."""

    service_name: Name | None = None
    min_seq: SeqNo | None = None
    correlation_id: CorrelationId | None = None


class InfrastructureQuery(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``hub.query.infrastructure``: every monitored component, or the one named, each
    with its status, last check and the services that require it."""

    component: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    min_seq: SeqNo | None = None
    correlation_id: CorrelationId | None = None


LabelName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
LabelValue = Annotated[str, msgspec.Meta(max_length=1024)]
# A point in time: ISO 8601 (``2025-06-15T12:00:00Z``) or seconds since the epoch.
TimeArg = Annotated[str, msgspec.Meta(max_length=64)] | float


class MatcherArg(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A label matcher given as an object (the string form: ``name="value"``...)."""

    name: LabelName
    op: Literal["=", "!=", "=~", "!~"]
    value: LabelValue


class AlertsQuery(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``hub.query.alerts``: the alert history (PostgreSQL), newest first.

    ``include``: ``alerts`` (default), ``notifications`` or ``silences``. ``state``:
    for alerts ``active`` (default: pending or firing), ``firing``, ``pending``,
    ``resolved``, ``all``; for notifications ``all`` (default), ``due``, ``sent``,
    ``retrying``, ``failed``; for silences ``active`` (default), ``pending``,
    ``expired``, ``all``. ``labels`` (equal values) and ``matchers`` (Alertmanager's:
    ``name="v"``, ``name!="v"``, ``name=~"re"``, ``name!~"re"``, or objects) filter on
    an alert's labels, a notification's group labels. ``since``/``until``: alerts
    active at some time between them, notifications due between them.
    """

    include: Literal["alerts", "notifications", "silences"] = "alerts"
    state: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    severity: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    labels: Annotated[dict[LabelName, LabelValue], msgspec.Meta(max_length=32)] = {}
    matchers: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=1200)] | MatcherArg],
        msgspec.Meta(max_length=32),
    ] = []
    since: TimeArg | None = None
    until: TimeArg | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    min_seq: SeqNo | None = None
    correlation_id: CorrelationId | None = None


class StatusQuery(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``hub.query.status``: the hub's own health (role, event log, ingress backlog)."""

    correlation_id: CorrelationId | None = None


Q = TypeVar(
    "Q", ServicesQuery, ServiceQuery, InstancesQuery, HealthQuery, InfrastructureQuery,
    AlertsQuery, StatusQuery,
)  # fmt: skip


class StandardResponse(msgspec.Struct, kw_only=True, omit_defaults=False):
    """The reply envelope of every ``hub.query.*`` (the seed's StandardResponse)."""

    success: bool
    data: Any = None
    error_code: str | None = None
    error_message: str | None = None
    processing_time_ms: float = 0.0
    correlation_id: str | None = None
    metadata: dict[str, Any] = {}


def parse_query(payload: bytes, query_type: type[Q]) -> Q:
    """Decode a query request; an empty body means "no filters".

    Raises:
        WireError: MALFORMED_UTF8, MALFORMED_JSON or INVALID_REQUEST with the offending field.
    """
    if not payload.strip():
        payload = b"{}"
    check_utf8(payload)
    try:
        return msgspec.json.decode(payload, type=query_type)
    except msgspec.ValidationError as exc:
        raise WireError("INVALID_REQUEST", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise WireError("MALFORMED_JSON", str(exc)) from None


def encode_response(response: StandardResponse) -> bytes:
    return _encoder.encode(response)
