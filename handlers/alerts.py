"""What the hub knows of its alerts (pure): the state and its fold.

``AlertState`` is folded from the recorded alert events (``evolve_alert``): the rules in
force, the active alerts (one per fingerprint), the silences, the notification groups and
the outbox of notifications due and not yet sent. The decisions taken on it are
``handlers.alerting``; nothing here reads a clock or does I/O.

A group (Alertmanager's meaning) is the alerts one route sends to one receiver with the
same values of its ``group_by`` labels. What a group last notified is folded from its
``NotificationDue`` events, so after a restart the hub knows what was already said.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from events.model import (
    AlertAcknowledged,
    AlertFiring,
    AlertInhibited,
    AlertPending,
    AlertResolved,
    AlertRulesLoaded,
    AlertUninhibited,
    Event,
    HubSampled,
    NotificationDue,
    NotificationFailed,
    NotificationSent,
    SilenceCreated,
    SilenceExpired,
)
from handlers.alert_rules import AlertingConfig, Matcher, Route, Rule, matches_all
from handlers.deadlines import Deadlines

PENDING = "pending"
FIRING = "firing"


@dataclass
class Alert:
    """One active alert (pending or firing)."""

    fingerprint: str
    rule: str
    severity: str
    labels: dict[str, str]
    annotations: dict[str, str]
    active_since: float
    state: str = PENDING
    fired_at: float = 0.0
    value: float | None = None
    inhibited_by: str | None = None
    acknowledged: bool = False

    def summary(self) -> dict[str, Any]:
        """The alert as a notification lists it."""
        return {
            "fingerprint": self.fingerprint, "rule": self.rule, "severity": self.severity,
            "labels": dict(self.labels), "annotations": dict(self.annotations),
            "active_since": self.active_since,
        }  # fmt: skip


@dataclass(frozen=True)
class Silence:
    silence_id: str
    matchers: tuple[Matcher, ...]
    starts_at: float
    ends_at: float
    created_by: str
    comment: str = ""

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def mutes(self, labels: dict[str, str], now: float) -> bool:
        return self.active(now) and matches_all(self.matchers, labels)


@dataclass
class Group:
    """A notification group of one route (and so one receiver).

    Attributes:
        key: ``<route path>:{label=value,...}``, stable across restarts.
        receiver: the route's receiver; the group is notified through each of its
            integrations.
        members: fingerprints of the active alerts in the group.
        resolved: alerts that resolved (having fired) since the last notification, as
            listed in the next one (``Alert.summary`` plus ``resolved_at``, ``silenced``).
        notified: per integration, the firing set last notified (``fp@active_since``)
            and when; what the next notification is compared with.
        epoch: per integration, how often the same firing set was repeated.
        flush_at: when the group is next looked at (None: nothing scheduled).
        last_flush: when it was last looked at (0: never, it waits ``group_wait``).
    """

    key: str
    receiver: str
    labels: dict[str, str]
    group_wait_s: float
    group_interval_s: float
    repeat_interval_s: float
    members: set[str] = field(default_factory=set)
    resolved: dict[str, dict[str, Any]] = field(default_factory=dict)
    notified: dict[str, tuple[frozenset[str], float]] = field(default_factory=dict)
    epoch: dict[str, int] = field(default_factory=dict)
    flush_at: float | None = None
    last_flush: float = 0.0


@dataclass
class OutboxEntry:
    """A notification due and not sent: what the dispatcher is to (re)try."""

    due: NotificationDue
    attempts: int = 0
    next_attempt_at: float = 0.0


@dataclass
class AlertState:
    """The fold of the alert events, and what the decisions keep between turns.

    Attributes:
        config, digest, source: the rules in force (``AlertRulesLoaded``).
        alerts: the active alerts by fingerprint.
        silences: silences not yet expired, by id.
        groups: notification groups with active members or a notification to give.
        outbox: notifications due and not sent (nor given up), by id.
        gauges: the hub's last sample of itself (``HubSampled``).
        deadlines: what is due when (``handlers.alerting``): ``("fire", fp)``,
            ``("flush", group key)``, ``("silence", id)``; lower bounds, re-checked.
        dirty: subjects whose conditions may have changed since the alert pass last ran
            (see ``handlers.alerting.subjects_of``); ``everything``: all of them (after
            a fold, or new rules).
    """

    config: AlertingConfig = field(default_factory=AlertingConfig)
    digest: str = ""
    source: str = ""
    alerts: dict[str, Alert] = field(default_factory=dict)
    silences: dict[str, Silence] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)
    outbox: dict[str, OutboxEntry] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    deadlines: Deadlines[tuple[str, str]] = field(default_factory=Deadlines)
    dirty: set[tuple[str, ...]] = field(default_factory=set)
    everything: bool = True
    loaded: bool = False

    def rule(self, name: str) -> Rule | None:
        for r in self.config.rules:
            if r.name == name:
                return r
        return None

    def silenced_by(self, labels: dict[str, str], now: float) -> list[str]:
        return sorted(s.silence_id for s in self.silences.values() if s.mutes(labels, now))


@dataclass(frozen=True)
class Routed:
    """A route an alert takes, with what it inherited resolved."""

    path: str
    receiver: str
    group_by: tuple[str, ...]
    group_wait_s: float
    group_interval_s: float
    repeat_interval_s: float


def routes_for(route: Route, labels: dict[str, str]) -> list[Routed]:
    """The routes an alert with ``labels`` takes (Alertmanager): from the root, the first
    matching child (and the next ones while a matching child says ``continue``),
    recursively; the node itself when no child matches."""
    root = Routed("0", route.receiver or "default", route.group_by or (),
                  route.group_wait_s or 0.0, route.group_interval_s or 0.0,
                  route.repeat_interval_s or 0.0)  # fmt: skip
    return _descend(route, root, labels)


def _descend(node: Route, here: Routed, labels: dict[str, str]) -> list[Routed]:
    out: list[Routed] = []
    for i, child in enumerate(node.routes):
        if not matches_all(child.matchers, labels):
            continue
        inherited = Routed(
            f"{here.path}.{i}",
            child.receiver if child.receiver is not None else here.receiver,
            child.group_by if child.group_by is not None else here.group_by,
            _pick(child.group_wait_s, here.group_wait_s),
            _pick(child.group_interval_s, here.group_interval_s),
            _pick(child.repeat_interval_s, here.repeat_interval_s),
        )
        out += _descend(child, inherited, labels)
        if not child.continue_:
            break
    return out or [here]


def _pick(mine: float | None, inherited: float) -> float:
    return inherited if mine is None else mine


def group_of(routed: Routed, labels: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The group key and labels of an alert on a route (``group_by: [...]``: every label,
    so each alert is its own group)."""
    names = sorted(labels) if "..." in routed.group_by else sorted(routed.group_by)
    group_labels = {n: labels.get(n, "") for n in names}
    return routed.path + ":{" + ",".join(f"{k}={v!r}" for k, v in group_labels.items()) + "}", (
        group_labels
    )


def _join_groups(state: AlertState, alert: Alert, now: float) -> None:
    for routed in routes_for(state.config.route, alert.labels):
        key, labels = group_of(routed, alert.labels)
        group = state.groups.get(key)
        if group is None:
            group = state.groups[key] = Group(
                key, routed.receiver, labels, routed.group_wait_s, routed.group_interval_s,
                routed.repeat_interval_s,
            )  # fmt: skip
        group.members.add(alert.fingerprint)
        changed(state, group, now)


def changed(state: AlertState, group: Group, now: float) -> None:
    """What the group notifies may have changed: look at it after ``group_wait`` (a new
    group) or at the next ``group_interval`` after its last notification."""
    if group.last_flush:
        when = max(now, group.last_flush + group.group_interval_s)
    else:
        when = now + group.group_wait_s if group.flush_at is None else group.flush_at
    schedule(state, group, when)


def schedule(state: AlertState, group: Group, when: float) -> None:
    if group.flush_at is None or when < group.flush_at:
        group.flush_at = when
        state.deadlines.push(when, ("flush", group.key))


def evolve_alert(state: AlertState, event: Event) -> None:
    """Apply one recorded alert event (in place)."""
    match event:
        case AlertRulesLoaded():
            state.config = AlertingConfig.from_data(event.config)
            state.digest, state.source, state.loaded = event.digest, event.source, True
            state.everything = True
        case AlertPending():
            state.alerts[event.fingerprint] = Alert(
                event.fingerprint, event.rule, event.severity, dict(event.labels),
                dict(event.annotations), event.active_since, PENDING, value=event.value,
            )  # fmt: skip
            rule = state.rule(event.rule)
            wait = rule.for_s if rule is not None else 0.0
            state.deadlines.push(event.active_since + wait, ("fire", event.fingerprint))
        case AlertFiring():
            alert = state.alerts.get(event.fingerprint)
            if alert is None or alert.active_since != event.active_since:
                alert = state.alerts[event.fingerprint] = Alert(
                    event.fingerprint, event.rule, event.severity, dict(event.labels),
                    dict(event.annotations), event.active_since, value=event.value,
                )  # fmt: skip
            alert.state, alert.fired_at = FIRING, event.ts
            alert.annotations = dict(event.annotations)
            state.dirty.add(("alert", event.fingerprint))
            _join_groups(state, alert, event.ts)
        case AlertResolved():
            alert = state.alerts.pop(event.fingerprint, None)
            if alert is not None:
                state.dirty.add(("resolved", event.fingerprint))
                _resolved_into_groups(state, alert, event)
        case AlertInhibited():
            alert = state.alerts.get(event.fingerprint)
            if alert is not None:
                alert.inhibited_by = event.by
                _regroup(state, alert, event.ts)
        case AlertUninhibited():
            alert = state.alerts.get(event.fingerprint)
            if alert is not None and alert.inhibited_by == event.by:
                alert.inhibited_by = None
                state.dirty.add(("alert", event.fingerprint))
                _regroup(state, alert, event.ts)
        case AlertAcknowledged():
            alert = state.alerts.get(event.fingerprint)
            if alert is not None:
                alert.acknowledged = True
        case SilenceCreated():
            state.silences[event.silence_id] = Silence(
                event.silence_id, tuple(Matcher(m["name"], m["op"], m["value"])  # type: ignore[arg-type]
                                        for m in event.matchers),
                event.starts_at, event.ends_at, event.created_by, event.comment,
            )  # fmt: skip
            state.deadlines.push(event.starts_at, ("silence", event.silence_id))
            state.deadlines.push(event.ends_at, ("silence", event.silence_id))
        case SilenceExpired():
            silence = state.silences.pop(event.silence_id, None)
            if silence is not None:
                state.dirty.add(("unsilenced", event.silence_id))
                _unsilenced(state, silence, event.ts)
        case NotificationDue():
            state.outbox[event.notification_id] = OutboxEntry(event)
            group = state.groups.get(event.group_key)
            if group is not None:
                firing = frozenset(episode(a) for a in event.firing)
                group.notified[event.receiver] = (firing, event.ts)
                group.epoch[event.receiver] = event.epoch
                group.last_flush = max(group.last_flush, event.ts)
                told(state, group, event.ts)
        case NotificationSent():
            state.outbox.pop(event.notification_id, None)
        case NotificationFailed():
            entry = state.outbox.get(event.notification_id)
            if entry is not None:
                if event.next_attempt_at <= 0:
                    del state.outbox[event.notification_id]
                else:
                    entry.attempts = event.attempt
                    entry.next_attempt_at = event.next_attempt_at
        case HubSampled():
            state.gauges.update(event.values)
            state.dirty.add(("gauges",))
        case _:
            pass


def told(state: AlertState, group: Group, at: float) -> None:
    """The group was notified (or had nothing to say) at ``at``: the resolved alerts up to
    then are said; a group left with nothing is gone (a new alert starts a new one)."""
    group.resolved = {fp: r for fp, r in group.resolved.items() if r["resolved_at"] > at}
    if not group.members and not group.resolved:
        state.groups.pop(group.key, None)


def _regroup(state: AlertState, alert: Alert, now: float) -> None:
    """An alert's inhibition changed: its groups are looked at again."""
    for group in state.groups.values():
        if alert.fingerprint in group.members:
            changed(state, group, now)


def episode(summary: dict[str, Any]) -> str:
    """An alert's identity in a notification: fingerprint and when it became active."""
    return f"{summary['fingerprint']}@{summary['active_since']!r}"


def _resolved_into_groups(state: AlertState, alert: Alert, event: AlertResolved) -> None:
    """A resolved alert leaves its groups; one that fired is listed in their next
    notification as resolved."""
    for group in state.groups.values():
        if alert.fingerprint not in group.members:
            continue
        group.members.discard(alert.fingerprint)
        if event.fired and alert.state == FIRING:
            group.resolved[alert.fingerprint] = {
                **alert.summary(), "resolved_at": event.ts,
                "silenced": bool(state.silenced_by(alert.labels, event.ts)),
                "inhibited": alert.inhibited_by is not None,
            }  # fmt: skip
            changed(state, group, event.ts)


def _unsilenced(state: AlertState, silence: Silence, now: float) -> None:
    """Groups with firing alerts the silence muted are looked at again at once."""
    for group in state.groups.values():
        for fp in group.members:
            alert = state.alerts.get(fp)
            if alert is not None and matches_all(silence.matchers, alert.labels):
                schedule(state, group, now)  # at once
                break
