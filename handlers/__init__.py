"""Pure reactions to events: ``(state, event, now) -> (state, [events])``. No I/O.

Ingress events go through ``react``; the timer's decisions come from ``tick``
(``handlers.liveness``) and are folded with ``evolve`` like everything else.
"""

from __future__ import annotations

from collections.abc import Callable

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
from handlers.liveness import tick
from handlers.registry import LivenessPolicy, RegistryState, decide, evolve, fold, handle

Reaction = Callable[[RegistryState, Event, float], tuple[RegistryState, list[Event]]]


def record(state: RegistryState, event: Event, now: float) -> tuple[RegistryState, list[Event]]:
    """A decision already taken (by the hub's timer): recorded as is."""
    del now
    evolve(state, event)
    return state, [event]


# The one registry of reactions: which handler reacts to which event type.
REACTIONS: dict[type[Event], Reaction] = {
    ServiceRegistered: handle,
    HeartbeatReceived: handle,
    ServiceDeregistered: handle,
    InputRejected: handle,
    InstanceHealthChanged: record,
    InstanceExpired: record,
    FlappingStarted: record,
    FlappingEnded: record,
    SelfPreservationStarted: record,
    SelfPreservationEnded: record,
    InfraChecked: handle,
    InfraStatusChanged: record,
    InfraConfigLoaded: record,
}


def react(state: RegistryState, event: Event, now: float) -> tuple[RegistryState, list[Event]]:
    """Dispatch an event to its reaction; an event nobody reacts to is recorded as is."""
    reaction = REACTIONS.get(type(event))
    if reaction is None:
        evolve(state, event)
        return state, [event]
    return reaction(state, event, now)


__all__ = [
    "REACTIONS",
    "LivenessPolicy",
    "RegistryState",
    "decide",
    "evolve",
    "fold",
    "handle",
    "react",
    "tick",
]
