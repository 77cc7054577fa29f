"""The registry: decide (pure reaction) and evolve (the fold of the log).

``decide(state, event, now)`` reads the state and returns the events to record;
``evolve(state, event)`` applies one recorded event. Neither does I/O nor reads
the clock. For speed the state is updated in place by ``evolve`` (a registry of
10,000 instances cannot be copied per heartbeat); ``decide`` never mutates it.
The same fold is the reference the projections are checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from events.model import (
    Event,
    HeartbeatReceived,
    InputRejected,
    ServiceDeregistered,
    ServiceRegistered,
)
from handlers.ledger import SeqLedger

InstanceKey = tuple[str, str, str]  # tenant, service_name, instance_id

LIVE = "healthy"
DEREGISTERED = "deregistered"


@dataclass
class Instance:
    """What the registry knows of one instance (one row of ``service_registry``)."""

    tenant: str
    service_name: str
    instance_id: str
    host: str
    port: int
    protocol: str
    health_endpoint: str
    version: str
    metadata: dict[str, Any]
    transport_preferences: list[str]
    heartbeat_interval_s: float
    depends_on: list[str]
    status: str
    registered_at: float
    last_seen: float
    load: float | None = None

    @property
    def live(self) -> bool:
        return self.status != DEREGISTERED


@dataclass
class RegistryState:
    """The fold of the event log.

    Attributes:
        instances: every instance ever registered, deregistered ones included
            (the registry keeps its history; the live view leaves them out).
        rejected: count of rejected inputs per tenant.
        ingress: the ingress sequences already recorded, which the ingest loop
            uses to skip re-delivered input after a crash.
    """

    instances: dict[InstanceKey, Instance] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    ingress: SeqLedger = field(default_factory=SeqLedger)

    def live(self, key: InstanceKey) -> Instance | None:
        inst = self.instances.get(key)
        return inst if inst is not None and inst.live else None


def _key(event: ServiceRegistered | ServiceDeregistered | HeartbeatReceived) -> InstanceKey:
    return (event.tenant, event.service_name, event.instance_id)


def unknown_instance(event: HeartbeatReceived | ServiceDeregistered) -> InputRejected:
    """The rejection recorded instead of an event about an instance nobody registered."""
    what = "heartbeat" if isinstance(event, HeartbeatReceived) else "deregister"
    return InputRejected(
        event_id=event.event_id,
        tenant=event.tenant,
        ts=event.ts,
        ingress_seq=event.ingress_seq,
        subject=f"hub.{what}",
        reason_code="UNKNOWN_INSTANCE",
        reason=(
            f"{what} for {event.service_name}/{event.instance_id}, which is not registered "
            f"in tenant {event.tenant!r}; register it first"
        ),
    )


def decide(state: RegistryState, event: Event, now: float) -> list[Event]:
    """What to record for one candidate event from ingress.

    A registration is always recorded (re-registration is idempotent); a
    heartbeat or deregistration of an instance that is not live becomes an
    ``InputRejected`` with reason ``UNKNOWN_INSTANCE``.
    """
    del now  # the ingress events carry their own time; timers (later) use now
    match event:
        case HeartbeatReceived() | ServiceDeregistered():
            if state.live(_key(event)) is None:
                return [unknown_instance(event)]
            return [event]
        case _:
            return [event]


def evolve(state: RegistryState, event: Event) -> RegistryState:
    """Apply one recorded event to the state (in place) and return it."""
    if event.ingress_seq:
        state.ingress.add(event.ingress_seq)
    match event:
        case ServiceRegistered():
            key = _key(event)
            previous = state.live(key)
            state.instances[key] = Instance(
                tenant=event.tenant,
                service_name=event.service_name,
                instance_id=event.instance_id,
                host=event.host,
                port=event.port,
                protocol=event.protocol,
                health_endpoint=event.health_endpoint,
                version=event.version,
                metadata=dict(event.metadata),
                transport_preferences=list(event.transport_preferences),
                heartbeat_interval_s=event.heartbeat_interval_s,
                depends_on=list(event.depends_on),
                status=LIVE,
                registered_at=previous.registered_at if previous else event.ts,
                last_seen=max(event.ts, previous.last_seen) if previous else event.ts,
                load=previous.load if previous else None,
            )
        case HeartbeatReceived():
            inst = state.live(_key(event))
            if inst is not None:
                inst.status = event.status
                inst.last_seen = max(inst.last_seen, event.ts)
                inst.load = event.load
        case ServiceDeregistered():
            inst = state.live(_key(event))
            if inst is not None:
                inst.status = DEREGISTERED
        case InputRejected():
            state.rejected[event.tenant] = state.rejected.get(event.tenant, 0) + 1
        case _:
            pass
    return state


def handle(state: RegistryState, event: Event, now: float) -> tuple[RegistryState, list[Event]]:
    """Decide, then fold what was decided: ``(state, event, now) -> (state, events)``."""
    recorded = decide(state, event, now)
    for e in recorded:
        evolve(state, e)
    return state, recorded


def fold(events: list[Event], state: RegistryState | None = None) -> RegistryState:
    """The pure fold of a sequence of recorded events."""
    state = RegistryState() if state is None else state
    for e in events:
        evolve(state, e)
    return state
