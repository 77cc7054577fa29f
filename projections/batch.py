"""A batch of log records planned for the views (pure): what it touches, sorted by what
the views write for it, and the fold of the instances it touches.

Both projections apply a batch the same way: ``plan_batch`` sorts its records in one
pass; the projection looks up what its view holds of the instances the batch touches
(its cache, else one read); ``fold_instances`` folds the batch over them with the hub's
own ``evolve``; each touched instance is then written once. Many heartbeats of one
instance become one write, and the result is by construction what applying the
records one by one gives.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import get_args

from events.log import LogRecord
from events.model import (
    ALERT_EVENTS,
    HEALTH_EVENTS,
    INFRA_EVENTS,
    Event,
    HeartbeatReceived,
    InputRejected,
    InstanceExpired,
    SelfPreservationEnded,
    SelfPreservationStarted,
    ServiceDeregistered,
    ServiceRegistered,
)
from handlers.registry import Instance, InstanceEvent, InstanceKey, evolve, key_of
from projections.fold import view_registry

# Only these can make an instance enter or leave the live view.
MEMBERSHIP_EVENTS = (ServiceRegistered, ServiceDeregistered, InstanceExpired)

_INSTANCE_TYPES = frozenset(get_args(InstanceEvent))
_MEMBERSHIP_TYPES = frozenset(MEMBERSHIP_EVENTS)
_HEALTH_TYPES = frozenset(HEALTH_EVENTS)
_INFRA_TYPES = frozenset(INFRA_EVENTS)
_ALERT_TYPES = frozenset(ALERT_EVENTS)


@dataclass(slots=True)
class BatchPlan:
    """A batch's records sorted by what the views write for them (each list in log order).

    Attributes:
        instances: each instance the batch touches (its events, heartbeats included), in
            the order first touched: True when only heartbeats touch it.
        instance_events: the events about instances, to fold over them.
        membership: the (tenant, service) pairs whose live instances may change (a
            registration, deregistration or expiry in the batch).
        registered: tenants that registered an instance.
        rejections: rejected input.
        health: the events of the health history (instances' health, flapping,
            self-preservation).
        preservation: each tenant's self-preservation as the batch leaves it: the
            period started, or None (ended); tenants the batch does not mention absent.
        infra: infrastructure events.
        alerts: alert events (``projections.alert_view`` folds them).
    """

    instances: dict[InstanceKey, bool] = field(default_factory=dict)
    instance_events: list[Event] = field(default_factory=list)
    membership: dict[tuple[str, str], None] = field(default_factory=dict)
    registered: set[str] = field(default_factory=set)
    rejections: list[InputRejected] = field(default_factory=list)
    health: list[Event] = field(default_factory=list)
    preservation: dict[str, SelfPreservationStarted | None] = field(default_factory=dict)
    infra: list[Event] = field(default_factory=list)
    alerts: list[Event] = field(default_factory=list)


def plan_batch(records: Sequence[LogRecord]) -> BatchPlan:
    """Sort ``records`` (not yet applied, each once, in log order) into a plan."""
    plan = BatchPlan()
    instances, instance_events = plan.instances, plan.instance_events
    for r in records:
        e = r.event
        if isinstance(e, HeartbeatReceived):  # the bulk, first
            instances.setdefault((e.tenant, e.service_name, e.instance_id), True)
            instance_events.append(e)
            continue
        kind = type(e)
        if kind in _INSTANCE_TYPES:
            k = key_of(e)  # type: ignore[arg-type]
            instances[k] = False
            instance_events.append(e)
            if kind in _MEMBERSHIP_TYPES:
                plan.membership[k[:2]] = None
                if kind is ServiceRegistered:
                    plan.registered.add(e.tenant)
            if kind in _HEALTH_TYPES:  # an expiry is both
                plan.health.append(e)
        elif isinstance(e, InputRejected):
            plan.rejections.append(e)
        elif kind in _HEALTH_TYPES:
            plan.health.append(e)
            if isinstance(e, SelfPreservationStarted):
                plan.preservation[e.tenant] = e
            elif isinstance(e, SelfPreservationEnded):
                plan.preservation[e.tenant] = None
        elif kind in _INFRA_TYPES:
            plan.infra.append(e)
        elif kind in _ALERT_TYPES:
            plan.alerts.append(e)
    return plan


# One instance a batch touches, after the batch: (key, instance, heartbeats_only).
# ``instance`` None: neither the view nor the batch has it (a heartbeat of an unknown
# instance). ``heartbeats_only``: only heartbeats touched it and the view holds it
# exactly as known, so only its heartbeat fields (``canonical.HEARTBEAT_FIELDS``) can
# differ from what the view holds. A plain tuple: a NamedTuple made per instance was a
# fifth of a heartbeat batch's planning.
Touched = tuple[InstanceKey, Instance | None, bool]


def fold_instances(
    plan: BatchPlan, known: dict[InstanceKey, Instance], exact: Container[InstanceKey] = ()
) -> list[Touched]:
    """Fold the batch over the instances it touches.

    Args:
        plan: the batch.
        known: what the view holds of the touched instances, as the fold's instances;
            folded in place (an instance the batch registers is added).
        exact: the instances of ``known`` whose every field is known to be what the view
            holds (a projection's cache of what it wrote): those only heartbeats touch
            need only their heartbeat fields written.

    Returns:
        Each touched instance after the batch (``Touched``), in the order first touched.
    """
    state = view_registry()
    state.instances = known
    for e in plan.instance_events:
        evolve(state, e)
    get = known.get
    out = []
    for k, beats in plan.instances.items():
        inst = get(k)
        out.append((k, inst, beats and inst is not None and k in exact))
    return out
