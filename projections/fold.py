"""The fold the views show (pure): the registry fold plus what only the views keep.

``hub replay`` and a healing projector rebuild a view from ``fold_view`` of the log;
``hub verify`` compares a view with the rendering of the same fold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from events.model import (
    ALERT_EVENTS,
    HEALTH_EVENTS,
    Event,
    HeartbeatReceived,
    InfraChecked,
    InfraStatusChanged,
    InputRejected,
)
from events.names import INFRA_TENANT
from handlers.ledger import SeqLedger
from handlers.registry import RegistryState, evolve
from projections.alert_view import AlertView


class Unrecorded(SeqLedger):
    """No view shows which ingress sequences were recorded (only the ingest loop needs
    that), so a fold for the views skips the bookkeeping: on a partitioned log the
    sequences come out of order, and tracking them was a tenth of replay's fold."""

    def add(self, seq: int) -> None:
        return None


def view_registry() -> RegistryState:
    """A registry state for the views' folds (ingress sequences not recorded)."""
    return RegistryState(ingress=Unrecorded())


@dataclass
class ViewState:
    """The registry fold plus what only the views keep: every rejection, the health and
    infrastructure histories, the alert history (``projections.alert_view``)."""

    registry: RegistryState = field(default_factory=view_registry)
    rejections: dict[str, InputRejected] = field(default_factory=dict)
    history: dict[str, Event] = field(default_factory=dict)
    infra_history: dict[str, InfraStatusChanged] = field(default_factory=dict)
    alerts: AlertView = field(default_factory=AlertView)

    def apply(self, event: Event) -> None:
        evolve(self.registry, event)
        if type(event) is HeartbeatReceived:  # the bulk of a log: nothing more to keep
            return
        if isinstance(event, InputRejected):
            self.rejections[event.event_id] = event
        elif isinstance(event, HEALTH_EVENTS):
            self.history[event.event_id] = event
        elif isinstance(event, InfraStatusChanged):
            self.infra_history[event.event_id] = event
        elif isinstance(event, ALERT_EVENTS):
            self.alerts.apply(event)


def fold_view(events: Iterable[Event]) -> ViewState:
    view = ViewState()
    for e in events:
        view.apply(e)
    return view


def last_check(name: str, fields: Mapping[str, Any]) -> InfraChecked | None:
    """A component's last check result as the fold holds it, from the fields a view
    stores of it (``last_result`` None: never checked)."""
    if fields["last_result"] is None:
        return None
    return InfraChecked(
        event_id="", tenant=INFRA_TENANT, ts=fields["checked_at"], component=name,
        status=fields["last_result"], response_time_ms=fields["response_time_ms"],
        error=fields["error"], metadata=fields["metadata"],
        consecutive_failures=fields["consecutive_failures"],
    )  # fmt: skip
