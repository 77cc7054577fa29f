"""The event types: a tagged union of msgspec Structs with a common envelope.

Rules (schema evolution): events are immutable facts, named in the past tense;
a new field always gets a default; a field's type never changes. The tag (the
``type`` field on the wire) is the class name and never changes either.
"""

from __future__ import annotations

from typing import Any

import msgspec

SCHEMA_VERSION = 1


class Event(msgspec.Struct, tag_field="type", tag=True, kw_only=True, frozen=True):
    """Envelope shared by every event.

    Attributes:
        event_id: deterministic id; for ingress-derived events ``ingress-<seq>``,
            so a re-delivered ingress message yields the same id.
        tenant: the tenant the event belongs to.
        ts: event time, seconds since the epoch (for ingress events: the time the
            ingress stream stored the message, so re-processing is deterministic).
        ingress_seq: sequence number of the ingress message this event answers,
            0 for events decided by the hub's own timers.
        schema: envelope schema version.
    """

    event_id: str
    tenant: str
    ts: float
    ingress_seq: int = 0
    schema: int = SCHEMA_VERSION


class ServiceRegistered(Event, frozen=True):
    """An instance of a service announced itself (or re-announced, idempotently)."""

    service_name: str
    instance_id: str
    host: str
    port: int
    protocol: str = "http"
    version: str = ""
    health_endpoint: str = "/health"
    metadata: dict[str, Any] = {}
    transport_preferences: list[str] = []
    heartbeat_interval_s: float = 10.0
    depends_on: list[str] = []


class ServiceDeregistered(Event, frozen=True):
    """An instance left the registry."""

    service_name: str
    instance_id: str
    reason: str = "requested"


class HeartbeatReceived(Event, frozen=True):
    """A registered instance proved it is alive and reported its own health."""

    service_name: str
    instance_id: str
    status: str = "healthy"
    load: float | None = None
    checks: dict[str, Any] = {}


class InputRejected(Event, frozen=True):
    """Ingress input that the hub refused, with the reason (the payload is in the DLQ)."""

    subject: str
    reason_code: str
    reason: str
    excerpt: str = ""


AnyEvent = ServiceRegistered | ServiceDeregistered | HeartbeatReceived | InputRejected

EVENT_TYPES: tuple[type[Event], ...] = (
    ServiceRegistered,
    ServiceDeregistered,
    HeartbeatReceived,
    InputRejected,
)

# The short name of each event type in watch subjects: hub.events.<tenant>.<kind>.
WATCH_KIND: dict[type[Event], str] = {
    ServiceRegistered: "registered",
    ServiceDeregistered: "deregistered",
    HeartbeatReceived: "heartbeat",
    InputRejected: "rejected",
}


def partition_key(event: Event) -> str:
    """The ordering key of an event in the log: tenant/service/instance.

    Every event about one instance shares a key, so a keyed log (Kafka) keeps
    them in order; events that are about no instance are keyed by tenant.
    """
    service = getattr(event, "service_name", None)
    instance = getattr(event, "instance_id", None)
    if service is not None and instance is not None:
        return f"{event.tenant}/{service}/{instance}"
    return f"{event.tenant}/-"
