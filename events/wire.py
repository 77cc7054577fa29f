"""The wire contract services speak (JSON), with its validation rules.

Inbound ingress messages are decoded with ``parse_*`` functions that either
return a typed message or raise ``WireError`` with a stable ``code`` and a
reason a sender can act on. Pure functions over bytes: no I/O.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from events.names import NAME_PATTERN

Name = Annotated[str, msgspec.Meta(pattern=f"^{NAME_PATTERN}$")]
Host = Annotated[
    str, msgspec.Meta(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9][A-Za-z0-9.:%\[\]-]*$")
]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Version = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[A-Za-z0-9._+-]*$")]
Protocol = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9+.-]{0,15}$")]
HealthEndpoint = Annotated[str, msgspec.Meta(max_length=256, pattern=r"^/[\x21-\x7e]*$")]
Transport = Literal["nats", "kafka", "http", "grpc"]
HealthStatus = Literal["healthy", "degraded", "unhealthy"]
Interval = Annotated[float, msgspec.Meta(gt=0, le=3600)]
Load = Annotated[float, msgspec.Meta(ge=0)]
MetaKey = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
MetaValue = str | int | float | bool | None
SeqNo = Annotated[int, msgspec.Meta(ge=0)]
CorrelationId = Annotated[str, msgspec.Meta(max_length=128)]


class WireError(ValueError):
    """Input that does not meet the wire contract.

    Attributes:
        code: stable machine-readable reason (``MALFORMED_JSON``, ``INVALID_FIELD``, ...).
        reason: human-readable explanation naming the offending field.
    """

    def __init__(self, code: str, reason: str) -> None:
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
    status: HealthStatus = "healthy"
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


def derive_instance_id(service_name: str, host: str, port: int) -> str:
    """A deterministic instance id for a registration that names none.

    Re-registering the same service at the same address yields the same id, so
    registration stays idempotent. The result always matches NAME_PATTERN.
    """
    digest = hashlib.sha1(f"{host}:{port}".encode()).hexdigest()[:12]
    return f"{service_name[:50]}-{digest}"


def _find_nul(value: Any, path: str) -> str | None:
    """The path of the first string (key or value) holding a NUL character, if any.

    JSON allows ``\\u0000`` but PostgreSQL text and jsonb do not; refusing it at
    the door keeps a poison event out of the log.
    """
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            if "\x00" in k:
                return f"{path} (a key)"
            found = _find_nul(v, f"{path}.{k}")
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _find_nul(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _decode(kind: str, payload: bytes) -> IngressMessage:
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
    extra = (
        msg.metadata
        if isinstance(msg, RegisterMessage)
        else (msg.checks if isinstance(msg, HeartbeatMessage) else {})
    )
    nul = _find_nul(extra, "$")
    if nul is not None:
        raise WireError("INVALID_FIELD", f"NUL character not allowed - at `{nul}`")
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


Q = TypeVar("Q", ServicesQuery, ServiceQuery, InstancesQuery, HealthQuery, InfrastructureQuery)


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
        WireError: MALFORMED_JSON or INVALID_REQUEST with the offending field.
    """
    if not payload.strip():
        payload = b"{}"
    try:
        return msgspec.json.decode(payload, type=query_type)
    except msgspec.ValidationError as exc:
        raise WireError("INVALID_REQUEST", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise WireError("MALFORMED_JSON", str(exc)) from None


def encode_response(response: StandardResponse) -> bytes:
    return _encoder.encode(response)
