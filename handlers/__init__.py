"""Pure reactions to events: ``(state, event, now) -> (state, [events])``. No I/O."""

from __future__ import annotations

from collections.abc import Callable

from events.model import (
    Event,
    HeartbeatReceived,
    InputRejected,
    ServiceDeregistered,
    ServiceRegistered,
)
from handlers.registry import RegistryState, decide, evolve, fold, handle

Reaction = Callable[[RegistryState, Event, float], tuple[RegistryState, list[Event]]]

# The one registry of reactions: which handler reacts to which event type.
REACTIONS: dict[type[Event], Reaction] = {
    ServiceRegistered: handle,
    HeartbeatReceived: handle,
    ServiceDeregistered: handle,
    InputRejected: handle,
}


def react(state: RegistryState, event: Event, now: float) -> tuple[RegistryState, list[Event]]:
    """Dispatch an event to its reaction; an event nobody reacts to is recorded as is."""
    reaction = REACTIONS.get(type(event))
    if reaction is None:
        evolve(state, event)
        return state, [event]
    return reaction(state, event, now)


__all__ = ["REACTIONS", "RegistryState", "decide", "evolve", "fold", "handle", "react"]
