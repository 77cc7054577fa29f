"""Infrastructure status (pure): from check results to recorded status changes.

A component is UNKNOWN until its first result, which sets its status at once.
From HEALTHY it turns UNHEALTHY only after ``failures_to_trip`` consecutive
failed checks (one lost packet is not an outage); one passing check makes it
HEALTHY again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from events.model import Event, InfraChecked, InfraConfigLoaded, InfraStatusChanged
from events.vocab import InfraStatus


@dataclass
class InfraComponent:
    """What the views show of one component: its configuration, status and last check."""

    name: str
    config: dict[str, Any]
    status: str = InfraStatus.UNKNOWN
    status_since: float = 0.0
    last_check: InfraChecked | None = None

    @property
    def consecutive_failures(self) -> int:
        return self.last_check.consecutive_failures if self.last_check else 0


@dataclass
class InfraState:
    """The monitored components (as last configured) and the services' requirements."""

    components: dict[str, InfraComponent] = field(default_factory=dict)
    service_dependencies: dict[str, list[str]] = field(default_factory=dict)
    digest: str = ""


def decide_check(state: InfraState, check: InfraChecked, *, failures_to_trip: int) -> list[Event]:
    """The events to record for one check result: the result (with the running count of
    consecutive failures) and, if it changes the status, the change. A result for a
    component no longer configured (a check that was in flight at a reload) is dropped."""
    comp = state.components.get(check.component)
    if comp is None:
        return []
    failures = comp.consecutive_failures + 1 if check.status == InfraStatus.UNHEALTHY else 0
    recorded = msgspec.structs.replace(check, consecutive_failures=failures)
    out: list[Event] = [recorded]
    if check.status == comp.status:
        return out
    if check.status == InfraStatus.HEALTHY:
        reason = f"check passed ({check.response_time_ms:.1f} ms)"
    elif comp.status == InfraStatus.UNKNOWN or failures >= failures_to_trip:
        reason = f"{failures} consecutive failed check(s): {check.error}"
    else:
        return out
    out.append(InfraStatusChanged(
        event_id=f"{check.event_id}.status", tenant=check.tenant, ts=check.ts,
        component=check.component, previous=comp.status, status=check.status,
        reason=reason, consecutive_failures=failures,
    ))  # fmt: skip
    return out


def evolve_infra(state: InfraState, event: Event) -> None:
    """Apply one recorded infrastructure event."""
    match event:
        case InfraConfigLoaded():
            listed = {c["name"]: c for c in event.components}
            for name in list(state.components):
                if name not in listed:
                    del state.components[name]
            for name, config in listed.items():
                comp = state.components.get(name)
                if comp is None:
                    state.components[name] = InfraComponent(name, dict(config),
                                                            status_since=event.ts)  # fmt: skip
                else:
                    comp.config = dict(config)
            state.service_dependencies = {k: list(v) for k, v in
                                          event.service_dependencies.items()}  # fmt: skip
            state.digest = event.digest
        case InfraChecked():
            comp = state.components.get(event.component)
            if comp is not None:
                comp.last_check = event
        case InfraStatusChanged():
            comp = state.components.get(event.component)
            if comp is not None:
                comp.status = event.status
                comp.status_since = event.ts
        case _:
            pass


def fold_infra(state: InfraState, events: Sequence[Event]) -> tuple[list[str], list[str]]:
    """Apply ``events`` in order (in place) and say what a view must rewrite: the
    components whose row changed (all of them after a configuration load) and the
    components that left; both sorted."""
    before = set(state.components)
    touched: set[str] = set()
    for e in events:
        evolve_infra(state, e)
        if isinstance(e, InfraConfigLoaded):
            touched = set(state.components)
        elif isinstance(e, InfraChecked | InfraStatusChanged):
            touched.add(e.component)
    now = set(state.components)
    return sorted(touched & now), sorted(before - now)
