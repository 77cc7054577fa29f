"""What-if replay of alerting (pure): the recorded history decided again with other rules.

``simulate(events, config)`` folds the recorded events in order, leaves out the alert
decisions recorded with the rules that were in force (alerts, inhibitions,
notifications, rule loads), and lets ``handlers.alerting`` decide them again with
``config`` at each event's own time, the timers (``for``, ``group_wait``, silences)
running in between. What the people did is kept: silences and acknowledgements. Nothing
is written anywhere; ``hub alerts simulate`` prints the result next to what was recorded.

The registry's own decisions (an instance critical, a component down) are facts of the
history, not re-decided: only the alerting changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from events.model import (
    ALERT_EVENTS,
    AlertAcknowledged,
    AlertFiring,
    AlertResolved,
    AlertRulesLoaded,
    Event,
    HubSampled,
    NotificationDue,
    NotificationSent,
    SilenceCreated,
    SilenceExpired,
)
from handlers.alert_rules import HUB_TENANT, AlertingConfig, digest_of
from handlers.alerting import alert_pass, next_due
from handlers.registry import RegistryState, evolve

# What people did, kept as recorded; every other alert event is a decision taken again.
_KEPT = (SilenceCreated, SilenceExpired, AlertAcknowledged, HubSampled)
_REDECIDED = tuple(t for t in ALERT_EVENTS if t not in _KEPT)


@dataclass(frozen=True)
class Episode:
    """One alert that fired: rule, labels, when it became active, fired, resolved."""

    fingerprint: str
    rule: str
    severity: str
    labels: dict[str, str]
    active_since: float
    fired_at: float
    resolved_at: float | None = None

    def key(self) -> tuple[str, float]:
        return (self.fingerprint, self.active_since)


@dataclass
class Simulation:
    """What the rules would have decided, and what was recorded, over the same history."""

    fired: list[Episode] = field(default_factory=list)
    notified: list[NotificationDue] = field(default_factory=list)
    recorded_fired: list[Episode] = field(default_factory=list)
    recorded_notified: list[NotificationDue] = field(default_factory=list)
    events: int = 0

    def extra(self) -> list[Episode]:
        """Alerts that would have fired and did not (by rule and labels)."""
        had = {(e.rule, _frozen(e.labels)) for e in self.recorded_fired}
        return [e for e in self.fired if (e.rule, _frozen(e.labels)) not in had]

    def missing(self) -> list[Episode]:
        """Alerts that fired and would not have."""
        would = {(e.rule, _frozen(e.labels)) for e in self.fired}
        return [e for e in self.recorded_fired if (e.rule, _frozen(e.labels)) not in would]


def _frozen(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def simulate(
    events: Iterable[Event], config: AlertingConfig, *, since: float | None = None
) -> Simulation:
    """Decide the alerting of ``events`` (in log order) again with ``config``; from
    ``since`` on (event time), or from the first event."""
    state = RegistryState()
    out = Simulation()
    fired: dict[tuple[str, float], Episode] = {}
    recorded: dict[tuple[str, float], Episode] = {}
    started = False
    last = 0.0

    def decided(decisions: list[Event]) -> None:
        for e in decisions:
            if isinstance(e, AlertFiring):
                ep = Episode(e.fingerprint, e.rule, e.severity, dict(e.labels), e.active_since,
                             e.ts)  # fmt: skip
                fired[ep.key()] = ep
                out.fired.append(ep)
            elif isinstance(e, AlertResolved) and e.fired:
                closing = fired.get((e.fingerprint, e.active_since))
                if closing is not None:
                    _close(out.fired, closing, e.ts)
            elif isinstance(e, NotificationDue):
                out.notified.append(e)
                # Sent at once: the simulation has no receivers.
                evolve(state, NotificationSent(event_id=f"{e.notification_id}.sent",
                                               tenant=HUB_TENANT, ts=e.ts,
                                               notification_id=e.notification_id,
                                               receiver=e.receiver))  # fmt: skip

    def run_timers(until: float) -> None:
        while (due := next_due(state)) <= until:
            decided(alert_pass(state, max(due, last), []))

    for event in events:
        out.events += 1
        if isinstance(event, _REDECIDED):
            _note_recorded(event, recorded, out)
            continue
        if not started and (since is None or event.ts >= since):
            started = True
            at = event.ts if since is None else since
            evolve(state, AlertRulesLoaded(event_id="what-if", tenant=HUB_TENANT, ts=at,
                                           source="what-if", digest=digest_of(config),
                                           config=config.to_data()))  # fmt: skip
            last = at
        if started:
            run_timers(event.ts)
        evolve(state, event)
        if started:
            last = max(last, event.ts)
            decided(alert_pass(state, last, [event]))
    if started:
        run_timers(last)
    out.recorded_fired = sorted(recorded.values(), key=lambda e: e.fired_at)
    if since is not None:
        out.recorded_fired = [e for e in out.recorded_fired if e.fired_at >= since]
        out.recorded_notified = [n for n in out.recorded_notified if n.ts >= since]
    return out


def _close(episodes: list[Episode], ep: Episode, at: float) -> None:
    episodes[episodes.index(ep)] = dataclasses.replace(ep, resolved_at=at)


def _note_recorded(event: Event, recorded: dict[tuple[str, float], Episode],
                   out: Simulation) -> None:  # fmt: skip
    if isinstance(event, AlertFiring):
        recorded[(event.fingerprint, event.active_since)] = Episode(
            event.fingerprint, event.rule, event.severity, dict(event.labels),
            event.active_since, event.ts)  # fmt: skip
    elif isinstance(event, AlertResolved) and event.fired:
        ep = recorded.get((event.fingerprint, event.active_since))
        if ep is not None:
            recorded[ep.key()] = dataclasses.replace(ep, resolved_at=event.ts)
    elif isinstance(event, NotificationDue):
        out.recorded_notified.append(event)
