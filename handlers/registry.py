"""The registry: decisions on ingress events (pure) and evolve (the fold of the log).

``decide_*(state, event, now)`` read the state and return the events to record
(``handlers.core.REACTIONS`` says which decides what);
``evolve(state, event)`` applies one recorded event. Neither does I/O nor reads
the clock. For speed the state is updated in place by ``evolve`` (a registry of
10,000 instances cannot be copied per heartbeat); a decision never mutates it.
The same fold is the reference the projections are checked against.

Health. An instance's ``status`` changes only through recorded events
(``InstanceHealthChanged``, ``FlappingStarted/Ended``, ``InstanceExpired``), so
replay never re-decides. A heartbeat carries the instance's own report; when it
differs from the recorded status the hub records a change (or, if the instance
changes too often, that it is flapping). Lease decisions (``critical``, expiry,
self-preservation) are taken by ``handlers.liveness.tick`` from the hub's timer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from events.model import (
    Event,
    FlappingEnded,
    FlappingStarted,
    HeartbeatReceived,
    InfraChecked,
    InfraConfigLoaded,
    InfraStatusChanged,
    InputRejected,
    InstanceExpired,
    InstanceHealthChanged,
    SelfPreservationEnded,
    SelfPreservationStarted,
    ServiceDeregistered,
    ServiceRegistered,
)
from events.vocab import Health
from handlers.alerts import AlertState, evolve_alert
from handlers.deadlines import TimerState
from handlers.infra import InfraState, decide_check, evolve_infra
from handlers.ledger import SeqLedger

InstanceKey = tuple[str, str, str]  # tenant, service_name, instance_id

# The instance health vocabulary (``events.vocab.Health``) under the names used here.
HEALTHY = Health.HEALTHY
DEGRADED = Health.DEGRADED
UNHEALTHY = Health.UNHEALTHY
CRITICAL = Health.CRITICAL  # missed its lease: no heartbeat within the TTL
DEREGISTERED = Health.DEREGISTERED
EXPIRED = Health.EXPIRED
LIVE = HEALTHY  # the health of a newly registered instance
GONE = frozenset({DEREGISTERED, EXPIRED})

DEFAULT_EXPIRE_AFTER_S = 60.0
CHANGES_KEPT = 16  # recent health changes remembered per instance (flap detection)


@dataclass(frozen=True)
class LivenessPolicy:
    """The hub's liveness rules (configuration; decisions made with it are recorded).

    Attributes:
        expire_after_s: default time an instance may stay critical before it expires.
        flap_window_s, flap_threshold: this many health changes within the window
            mark an instance as flapping.
        flap_quiet_s: a flapping instance whose reports have not changed for this
            long is stable again (hysteresis: entering needs many changes, leaving
            needs none for a while).
        preservation_share, preservation_min: self-preservation starts when at
            least this share of a tenant's live instances, and at least this many,
            are critical while one of them is due to expire.
        preservation_max_s: the bound: self-preservation ends by itself after this.
        max_lag_s: lease decisions are taken only while the hub is this close to
            the head of its ingress (a hub that is behind has not seen the latest
            heartbeats, so it must not judge them missing).
        infra_failures_to_trip: consecutive failed checks that make a HEALTHY
            infrastructure component UNHEALTHY.
    """

    expire_after_s: float = DEFAULT_EXPIRE_AFTER_S
    flap_window_s: float = 30.0
    flap_threshold: int = 5
    flap_quiet_s: float = 10.0
    preservation_share: float = 0.5
    preservation_min: int = 3
    preservation_max_s: float = 60.0
    max_lag_s: float = 1.0
    infra_failures_to_trip: int = 2


@dataclass
class Instance:
    """What the registry knows of one instance (one row of ``service_registry``).

    ``reported_changed_at`` and ``changes`` are the hub's short-term memory for
    flap detection: derived from recorded events but not part of any view (after
    a restart they may be less complete, which can only delay a flap detection).
    """

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
    ttl_s: float = 30.0
    expire_after_s: float = DEFAULT_EXPIRE_AFTER_S
    status_since: float = 0.0
    flapping: bool = False
    reported: str = HEALTHY
    checks: dict[str, Any] = field(default_factory=dict)
    reported_changed_at: float = 0.0
    changes: list[float] = field(default_factory=list)
    # When its key was first registered: the registry's (and the timer's) order; not
    # part of what the instance is (a partial fold numbers them differently).
    order: int = field(default=0, compare=False)

    @property
    def live(self) -> bool:
        return self.status not in GONE


@dataclass(frozen=True)
class Preservation:
    """A tenant's self-preservation period in force."""

    since: float
    until: float


@dataclass
class RegistryState:
    """The fold of the event log.

    Attributes:
        instances: every instance ever registered, deregistered and expired ones
            included (the registry keeps its history; the live view leaves them out).
        rejected: count of rejected inputs per tenant.
        ingress: the ingress sequences already recorded, which the ingest loop
            uses to skip re-delivered input after a crash.
        preservation: tenants in self-preservation now.
        preservation_cooldown: per tenant, the time before which self-preservation
            may not start again (after one ended at its bound).
        infra: the monitored infrastructure components and their status.
        policy: the liveness rules decisions are taken with.
        live_count, critical_count: live and critical instances per tenant (kept by
            the fold, so that self-preservation needs no scan).
        timers: the lease timer's deadlines (``handlers.liveness``); None until the
            timer first runs on this state (a fold that never runs it pays nothing).
        by_service: the instances of each service (``tenant, service``), by id.
        service_counts: per service, ``[live, trusted]``: its live instances, and those
            healthy and not flapping (its health, without a scan).
        alerts: the alerts, silences and notifications (``handlers.alerts``).
    """

    instances: dict[InstanceKey, Instance] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    ingress: SeqLedger = field(default_factory=SeqLedger)
    preservation: dict[str, Preservation] = field(default_factory=dict)
    preservation_cooldown: dict[str, float] = field(default_factory=dict)
    infra: InfraState = field(default_factory=InfraState)
    policy: LivenessPolicy = field(default_factory=LivenessPolicy)
    live_count: dict[str, int] = field(default_factory=dict)
    critical_count: dict[str, int] = field(default_factory=dict)
    timers: TimerState[InstanceKey] | None = None
    by_service: dict[tuple[str, str], dict[str, Instance]] = field(default_factory=dict)
    service_counts: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    alerts: AlertState = field(default_factory=AlertState)

    def live(self, key: InstanceKey) -> Instance | None:
        inst = self.instances.get(key)
        return inst if inst is not None and inst.live else None


InstanceEvent = (
    ServiceRegistered
    | ServiceDeregistered
    | HeartbeatReceived
    | InstanceHealthChanged
    | InstanceExpired
    | FlappingStarted
    | FlappingEnded
)


# The events that may change whether an instance is live or trusted (not heartbeats:
# they report, and the hub records a change as one of these).
_STANDING_EVENTS = frozenset({ServiceRegistered, ServiceDeregistered, InstanceHealthChanged,
                              InstanceExpired, FlappingStarted, FlappingEnded})  # fmt: skip


def key_of(event: InstanceEvent) -> InstanceKey:
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
            f"(or has expired) in tenant {event.tenant!r}; register it first"
        ),
    )


# --- decide ---------------------------------------------------------------------------


def health_change(
    inst: Instance, status: str, reason: str, *, event_id: str, ts: float, policy: LivenessPolicy
) -> Event:
    """The event for a health change of ``inst``: the change itself, or FlappingStarted
    when this change makes ``flap_threshold`` changes within the window."""
    recent = [t for t in inst.changes if t > ts - policy.flap_window_s]
    if len(recent) + 1 >= policy.flap_threshold:
        return FlappingStarted(
            event_id=event_id, tenant=inst.tenant, ts=ts, service_name=inst.service_name,
            instance_id=inst.instance_id, changes=len(recent) + 1,
            window_s=policy.flap_window_s, status=status,
        )  # fmt: skip
    return InstanceHealthChanged(
        event_id=event_id, tenant=inst.tenant, ts=ts, service_name=inst.service_name,
        instance_id=inst.instance_id, previous=inst.status, status=status, reason=reason,
        last_seen=inst.last_seen,
    )  # fmt: skip


def decide_heartbeat(state: RegistryState, hb: HeartbeatReceived, now: float) -> list[Event]:
    """A heartbeat of a live instance is recorded (with its running ``last_seen``), and a
    different health than recorded records the change too; one of an instance that is
    not live becomes an ``InputRejected`` with reason ``UNKNOWN_INSTANCE``."""
    del now  # ingress events carry their own time; timers (handlers.liveness) use now
    inst = state.live(key_of(hb))
    if inst is None:
        return [unknown_instance(hb)]
    recorded = msgspec.structs.replace(hb, last_seen=max(inst.last_seen, hb.ts))
    if inst.flapping or hb.status == inst.status:
        return [recorded]
    if inst.status == CRITICAL:
        reason = f"heartbeat resumed, reports {hb.status}"
    else:
        reason = f"instance reports {hb.status}"
        failing = sorted(k for k, v in hb.checks.items() if _check_failed(v))
        if failing:
            reason += f" (failing checks: {', '.join(failing[:5])})"
    # A heartbeat stored before the change it answers was recorded (the timer judged the
    # lease while it waited in ingress) takes effect now, not before: the instance's
    # history stays in time order.
    change = health_change(inst, hb.status, reason, event_id=f"{hb.event_id}.health",
                           ts=max(hb.ts, inst.status_since), policy=state.policy)  # fmt: skip
    return [recorded, change]


def _check_failed(value: Any) -> bool:
    """A check detail counts as failing when it says so (status/passing/ok fields)."""
    if isinstance(value, dict):
        status = value.get("status")
        if isinstance(status, str):
            return status.lower() not in ("ok", "pass", "passing", "healthy", "up")
        for flag in ("passing", "ok", "healthy"):
            if isinstance(value.get(flag), bool):
                return not value[flag]
    if isinstance(value, bool):
        return not value
    return False


def decide_deregistration(
    state: RegistryState, event: ServiceDeregistered, now: float
) -> list[Event]:
    """Recorded for a live instance; otherwise ``InputRejected`` (``UNKNOWN_INSTANCE``)."""
    del now
    if state.live(key_of(event)) is None:
        return [unknown_instance(event)]
    return [event]


def decide_registration(state: RegistryState, event: ServiceRegistered, now: float) -> list[Event]:
    """A registration is always recorded, with its lease resolved (re-registration is
    idempotent; a critical instance that re-registers is healthy again)."""
    del now
    # The lease is resolved now and recorded, so replay never depends on config.
    event = msgspec.structs.replace(
        event,
        ttl_s=event.ttl_s or 3 * event.heartbeat_interval_s,
        expire_after_s=event.expire_after_s or state.policy.expire_after_s,
    )
    inst = state.live(key_of(event))
    if inst is not None and inst.status == CRITICAL and not inst.flapping:
        return [event, health_change(inst, HEALTHY, "re-registered",
                                     event_id=f"{event.event_id}.health", ts=event.ts,
                                     policy=state.policy)]  # fmt: skip
    return [event]


def decide_infra_check(state: RegistryState, event: InfraChecked, now: float) -> list[Event]:
    """A check result, and the status change it causes (``handlers.infra``)."""
    del now
    return decide_check(state.infra, event, failures_to_trip=state.policy.infra_failures_to_trip)


# --- evolve ---------------------------------------------------------------------------


def _count(counts: dict[str, int], tenant: str, delta: int) -> None:
    counts[tenant] = counts.get(tenant, 0) + delta


def _set_status(state: RegistryState, inst: Instance, status: str, ts: float) -> None:
    if status == inst.status:
        return
    was_live, was_critical = inst.live, inst.status == CRITICAL
    inst.status = status
    inst.status_since = ts
    if inst.live != was_live:
        _count(state.live_count, inst.tenant, 1 if inst.live else -1)
    if (status == CRITICAL) != was_critical:
        _count(state.critical_count, inst.tenant, -1 if was_critical else 1)


def _touch(state: RegistryState, key: InstanceKey) -> None:
    """A deadline of this instance may have moved earlier: the timer looks again."""
    if state.timers is not None:
        state.timers.touched.add(key)


def _registered(state: RegistryState, event: ServiceRegistered) -> None:
    key = key_of(event)
    previous = state.live(key)
    ttl = event.ttl_s or 3 * event.heartbeat_interval_s
    expire_after = event.expire_after_s or DEFAULT_EXPIRE_AFTER_S
    if previous is not None:  # re-registration: same life, new details
        previous.host, previous.port, previous.protocol = event.host, event.port, event.protocol
        previous.health_endpoint, previous.version = event.health_endpoint, event.version
        previous.metadata = dict(event.metadata)
        previous.transport_preferences = list(event.transport_preferences)
        previous.heartbeat_interval_s = event.heartbeat_interval_s
        previous.depends_on = list(event.depends_on)
        previous.ttl_s, previous.expire_after_s = ttl, expire_after
        previous.last_seen = max(previous.last_seen, event.ts)
        return
    before = state.instances.get(key)
    _count(state.live_count, event.tenant, 1)
    state.instances[key] = state.by_service.setdefault(key[:2], {})[key[2]] = Instance(
        tenant=event.tenant, service_name=event.service_name, instance_id=event.instance_id,
        host=event.host, port=event.port, protocol=event.protocol,
        health_endpoint=event.health_endpoint, version=event.version,
        metadata=dict(event.metadata), transport_preferences=list(event.transport_preferences),
        heartbeat_interval_s=event.heartbeat_interval_s, depends_on=list(event.depends_on),
        status=LIVE, registered_at=event.ts, last_seen=event.ts,
        ttl_s=ttl, expire_after_s=expire_after, status_since=event.ts,
        order=len(state.instances) if before is None else before.order,
    )  # fmt: skip


def _heartbeat(state: RegistryState, event: HeartbeatReceived) -> None:
    inst = state.instances.get(key_of(event))
    if inst is None:
        return
    if event.status != inst.reported:
        inst.reported_changed_at = event.ts  # (earlier, if this heartbeat came late)
        _touch(state, key_of(event))
    inst.reported = event.status
    inst.load = event.load
    inst.checks = dict(event.checks)
    inst.last_seen = max(inst.last_seen, event.last_seen or event.ts)


def _remember_change(inst: Instance, ts: float) -> None:
    inst.changes.append(ts)
    del inst.changes[:-CHANGES_KEPT]


def _standing(inst: Instance | None) -> tuple[int, int]:
    """(live, trusted) of an instance, as 0/1: what it adds to its service's counts."""
    if inst is None or not inst.live:
        return 0, 0
    return 1, int(inst.status == HEALTHY and not inst.flapping)


def evolve(state: RegistryState, event: Event) -> RegistryState:
    """Apply one recorded event to the state (in place) and return it."""
    if event.ingress_seq:
        state.ingress.add(event.ingress_seq)
    if type(event) in _STANDING_EVENTS:
        key = key_of(event)  # type: ignore[arg-type]
        before = _standing(state.instances.get(key))
        _evolve(state, event)
        after = _standing(state.instances.get(key))
        if after != before:
            counts = state.service_counts.setdefault(key[:2], [0, 0])
            counts[0] += after[0] - before[0]
            counts[1] += after[1] - before[1]
        return state
    _evolve(state, event)
    return state


def _evolve(state: RegistryState, event: Event) -> None:
    match event:
        case HeartbeatReceived():
            _heartbeat(state, event)
        case ServiceRegistered():
            _registered(state, event)
            _touch(state, key_of(event))
        case ServiceDeregistered():
            inst = state.live(key_of(event))
            if inst is not None:
                _set_status(state, inst, DEREGISTERED, event.ts)
                inst.flapping = False
        case InstanceHealthChanged():
            inst = state.live(key_of(event))
            if inst is not None:
                _set_status(state, inst, event.status, event.ts)
                _remember_change(inst, event.ts)
                _touch(state, key_of(event))
        case FlappingStarted():
            inst = state.live(key_of(event))
            if inst is not None:
                _set_status(state, inst, event.status, event.ts)
                _remember_change(inst, event.ts)
                inst.flapping = True
                inst.reported_changed_at = max(inst.reported_changed_at, event.ts)
                _touch(state, key_of(event))
        case FlappingEnded():
            inst = state.live(key_of(event))
            if inst is not None:
                _set_status(state, inst, event.status, event.ts)
                inst.flapping = False
                inst.changes.clear()
                _touch(state, key_of(event))
        case InstanceExpired():
            inst = state.live(key_of(event))
            if inst is not None:
                _set_status(state, inst, EXPIRED, event.ts)
                inst.flapping = False
        case SelfPreservationStarted():
            state.preservation[event.tenant] = Preservation(since=event.ts, until=event.until)
        case SelfPreservationEnded():
            period = state.preservation.pop(event.tenant, None)
            if period is not None and event.reason == "bound_reached":
                state.preservation_cooldown[event.tenant] = event.ts + (period.until - period.since)
        case InputRejected():
            state.rejected[event.tenant] = state.rejected.get(event.tenant, 0) + 1
        case InfraChecked() | InfraStatusChanged() | InfraConfigLoaded():
            evolve_infra(state.infra, event)
        case _:
            evolve_alert(state.alerts, event)


def fold(events: list[Event], state: RegistryState | None = None) -> RegistryState:
    """The pure fold of a sequence of recorded events."""
    state = RegistryState() if state is None else state
    for e in events:
        evolve(state, e)
    return state
