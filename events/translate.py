"""Wire to event (pure): what one ingress message becomes before anything is decided.

``classify`` turns the subject and bytes of one ingress message into its candidate event
(a registration, heartbeat or deregistration, with its instance id derived when the
message names none), or into the ``InputRejected`` that says why it broke the contract.
Ids come from the ingress sequence, times from the stream: the same message always
translates to the same event.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Protocol

from events.model import (
    Event,
    HeartbeatReceived,
    InputRejected,
    ServiceDeregistered,
    ServiceRegistered,
)
from events.names import INVALID_TENANT
from events.subjects import route
from events.wire import (
    DeregisterMessage,
    HeartbeatMessage,
    RegisterMessage,
    WireError,
    parse_ingress,
)

EXCERPT_BYTES = 256
INTERNAL_ERROR = "INTERNAL_ERROR"  # the reason code of a message the hub itself failed on


class IngressRules(Protocol):
    """What translation needs of the hub's configuration (``hub.config.HubConfig``)."""

    @property
    def max_metadata_bytes(self) -> int: ...

    @property
    def max_deliver(self) -> int: ...

    def tenant_allowed(self, tenant: str) -> bool: ...


def derive_instance_id(service_name: str, host: str, port: int) -> str:
    """A deterministic instance id for a registration that names none.

    Re-registering the same service at the same address yields the same id, so
    registration stays idempotent. The result always matches NAME_PATTERN.
    """
    digest = hashlib.sha1(f"{host}:{port}".encode()).hexdigest()[:12]
    return f"{service_name[:50]}-{digest}"


def to_event(
    msg: RegisterMessage | HeartbeatMessage | DeregisterMessage, *, tenant: str, seq: int, ts: float
) -> Event:
    """The candidate event for a valid ingress message."""
    eid = f"ingress-{seq}"
    match msg:
        case RegisterMessage():
            return ServiceRegistered(
                event_id=eid, tenant=tenant, ts=ts, ingress_seq=seq,
                service_name=msg.service_name,
                instance_id=msg.instance_id
                or derive_instance_id(msg.service_name, msg.host, msg.port),
                host=msg.host, port=msg.port, protocol=msg.protocol, version=msg.version,
                health_endpoint=msg.health_endpoint, metadata=dict(msg.metadata),
                transport_preferences=list(msg.transport_preferences),
                heartbeat_interval_s=msg.heartbeat_interval_s, depends_on=list(msg.depends_on),
                ttl_s=msg.ttl_s or 0.0, expire_after_s=msg.expire_after_s or 0.0,
            )  # fmt: skip
        case HeartbeatMessage():
            return HeartbeatReceived(
                event_id=eid, tenant=tenant, ts=ts, ingress_seq=seq,
                service_name=msg.service_name, instance_id=msg.instance_id,
                status=msg.status, load=msg.load, checks=dict(msg.checks),
            )  # fmt: skip
        case DeregisterMessage():
            return ServiceDeregistered(
                event_id=eid, tenant=tenant, ts=ts, ingress_seq=seq,
                service_name=msg.service_name, instance_id=msg.instance_id,
            )  # fmt: skip


def printable(data: bytes | str, limit: int = EXCERPT_BYTES) -> str:
    """Text safe to store anywhere (PostgreSQL refuses NUL): bad bytes escaped."""
    if isinstance(data, bytes):
        data = data[:limit].decode("utf-8", errors="backslashreplace")
    return data[:limit].replace("\x00", "\\x00")


def rejected(
    *, tenant: str, seq: int, ts: float, subject: str, code: str, reason: str, payload: bytes
) -> InputRejected:
    return InputRejected(
        event_id=f"ingress-{seq}", tenant=tenant, ts=ts, ingress_seq=seq,
        subject=printable(subject), reason_code=code, reason=printable(reason, 2048),
        excerpt=printable(payload),
    )  # fmt: skip


def failed_on(
    *, tenant: str, seq: int, ts: float, subject: str, payload: bytes, error: BaseException
) -> InputRejected:
    """The rejection of a message the hub's own code failed on (a bug)."""
    return rejected(tenant=tenant, seq=seq, ts=ts, subject=subject, code=INTERNAL_ERROR,
                    reason=f"the hub failed on this message ({type(error).__name__}); "
                    "see its log", payload=payload)  # fmt: skip


# Routes are immutable and subjects few (a kind per tenant): parse each once.
_route = functools.lru_cache(maxsize=4096)(route)


def classify_checked(
    rules: IngressRules, subject: str, payload: bytes, *, seq: int, ts: float
) -> tuple[Event, Exception | None]:
    """``classify``, and the exception of the hub's own code it turned into a rejection
    (None if there was none), so that the caller can report it."""
    try:
        return _classify(rules, subject, payload, seq=seq, ts=ts), None
    except Exception as exc:
        return failed_on(tenant=INVALID_TENANT, seq=seq, ts=ts, subject=subject,
                         payload=payload, error=exc), exc  # fmt: skip


def classify(rules: IngressRules, subject: str, payload: bytes, *, seq: int, ts: float) -> Event:
    """Turn one ingress message into its candidate event, or an InputRejected.

    Never raises: input that breaks the contract is rejected with its reason code, and
    an exception of the hub's own code on this message (a bug) rejects it with
    ``INTERNAL_ERROR``, so no message can stop the hub.
    """
    return classify_checked(rules, subject, payload, seq=seq, ts=ts)[0]


def _classify(rules: IngressRules, subject: str, payload: bytes, *, seq: int, ts: float) -> Event:
    r = _route(subject)
    if r.tenant_error is not None:
        return rejected(tenant=INVALID_TENANT, seq=seq, ts=ts, subject=subject,
                        code="INVALID_TENANT", reason=r.tenant_error, payload=payload)  # fmt: skip
    if not rules.tenant_allowed(r.tenant):
        return rejected(tenant=INVALID_TENANT, seq=seq, ts=ts, subject=subject,
                        code="UNKNOWN_TENANT", reason=f"tenant {r.tenant!r} is not served here",
                        payload=payload)  # fmt: skip
    try:
        msg = parse_ingress(r.kind, payload, max_metadata_bytes=rules.max_metadata_bytes)
    except WireError as exc:
        return rejected(tenant=r.tenant, seq=seq, ts=ts, subject=subject, code=exc.code,
                        reason=exc.reason, payload=payload)  # fmt: skip
    return to_event(msg, tenant=r.tenant, seq=seq, ts=ts)


def quarantined(
    rules: IngressRules, subject: str, payload: bytes, *, seq: int, ts: float, failed: int
) -> InputRejected:
    """The rejection of a message the hub has failed on ``failed`` times (a bug): it is
    dead-lettered, not tried again."""
    r = _route(subject)
    tenant = (
        r.tenant if r.tenant_error is None and rules.tenant_allowed(r.tenant) else INVALID_TENANT
    )
    return rejected(tenant=tenant, seq=seq, ts=ts, subject=subject, code=INTERNAL_ERROR,
                    reason=f"the hub failed on this message {failed} times, so it is not tried "
                    f"again (HUB_MAX_DELIVER={rules.max_deliver}); see its log",
                    payload=payload)  # fmt: skip
