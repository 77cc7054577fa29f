"""The alert history the views keep (pure): each alert's episodes, the silences, the
notifications and the alerting configuration in force, folded from the alert events.

An alert (a ``fingerprint``) has at most one *open* episode at a time; an episode is
one (fingerprint, ``active_since``): ``AlertPending`` opens it, ``AlertFiring`` fires it
(or opens it firing, for a rule whose ``for`` is 0), ``AlertResolved`` closes it. The
events that change an alert (inhibited, uninhibited, acknowledged) apply to its open
episode, ``AlertResolved`` to its open episode if that is the one it names; without one
they are ignored. Closed episodes stay: the history.

Every rule here must give the same result on the whole fold (replay, verify) and on a
projection that folds a batch over only the rows it touches (``keys_of`` says which),
so a decision reads nothing but the fingerprint's open episode, the episode an event
names, and the silence or notification it names. Repeated records change nothing: an
episode once closed is not opened again, a silence or notification is created once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgspec

from events.model import (
    AlertAcknowledged,
    AlertFiring,
    AlertInhibited,
    AlertPending,
    AlertResolved,
    AlertRulesLoaded,
    AlertUninhibited,
    Event,
    NotificationDue,
    NotificationFailed,
    NotificationSent,
    SilenceCreated,
    SilenceExpired,
)
from handlers.alert_rules import Matcher, matches_all

# An episode's states (``alerts.state``).
PENDING = "pending"
FIRING = "firing"
RESOLVED = "resolved"
ACTIVE = (PENDING, FIRING)
# Why an open episode closed without ``AlertResolved``: a new one of the same alert opened.
SUPERSEDED = "superseded by a new episode"

# A notification's states (``alert_notifications.state``).
DUE = "due"
SENT = "sent"
RETRYING = "retrying"
FAILED = "failed"  # given up


def episode_id(fingerprint: str, active_since: float) -> str:
    """The key of an episode: its fingerprint and start, in microseconds (as stored)."""
    return f"{fingerprint}@{round(active_since * 1_000_000)}"


@dataclass(slots=True)
class Episode:
    """One episode of an alert (one row of ``alerts``)."""

    id: str
    fingerprint: str
    tenant: str
    rule: str
    severity: str
    state: str
    labels: dict[str, str]
    annotations: dict[str, str]
    active_since: float
    value: float | None = None
    fired_at: float | None = None
    resolved_at: float | None = None
    resolve_reason: str = ""
    inhibited_by: str | None = None  # the fingerprint of the alert that mutes this one
    inhibited_by_rule: str = ""
    inhibited_reason: str = ""
    acknowledged_by: str | None = None
    acknowledged_at: float | None = None
    acknowledged_comment: str = ""


@dataclass(slots=True)
class Silence:
    """A silence (one row of ``alert_silences``); ``expired_at``: ended early, at."""

    id: str
    tenant: str
    matchers: list[dict[str, str]]
    starts_at: float
    ends_at: float
    created_by: str
    comment: str
    created_at: float
    expired_at: float | None = None
    expired_by: str = ""
    expire_reason: str = ""


@dataclass(slots=True)
class Notification:
    """One notification of a group to one receiver (one row of ``alert_notifications``)."""

    id: str
    tenant: str
    receiver: str
    group_key: str
    group_labels: dict[str, str]
    firing: list[str]  # fingerprints
    resolved: list[str]
    epoch: int
    severity: str
    due_at: float
    state: str = DUE
    sent_at: float | None = None
    attempts: int = 0
    last_error: str = ""
    next_attempt_at: float | None = None
    detail: str = ""
    out_of_band: bool = False


@dataclass(slots=True)
class AlertConfig:
    """The alerting configuration in force (``AlertRulesLoaded``): which, from where."""

    digest: str
    source: str
    loaded_at: float


@dataclass(frozen=True)
class AlertKeys:
    """The rows a batch of alert events reads and may change (see ``keys_of``)."""

    fingerprints: frozenset[str] = frozenset()  # their open episodes
    episodes: frozenset[str] = frozenset()  # the episodes they name (open or not)
    silences: frozenset[str] = frozenset()
    notifications: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.fingerprints or self.silences or self.notifications)


def keys_of(events: Iterable[Event]) -> AlertKeys:
    """What folding ``events`` over a view needs to know of it (and may change)."""
    fingerprints: set[str] = set()
    episodes: set[str] = set()
    silences: set[str] = set()
    notifications: set[str] = set()
    for e in events:
        match e:
            case AlertPending() | AlertFiring():
                fingerprints.add(e.fingerprint)
                episodes.add(episode_id(e.fingerprint, e.active_since))
            case AlertResolved() | AlertInhibited() | AlertUninhibited() | AlertAcknowledged():
                fingerprints.add(e.fingerprint)
            case SilenceCreated() | SilenceExpired():
                silences.add(e.silence_id)
            case NotificationDue() | NotificationSent() | NotificationFailed():
                notifications.add(e.notification_id)
    return AlertKeys(frozenset(fingerprints), frozenset(episodes), frozenset(silences),
                     frozenset(notifications))  # fmt: skip


@dataclass
class AlertView:
    """The fold of the alert events (the whole history, or the rows a batch touches)."""

    episodes: dict[str, Episode] = field(default_factory=dict)
    open: dict[str, str] = field(default_factory=dict)  # fingerprint -> its open episode
    silences: dict[str, Silence] = field(default_factory=dict)
    notifications: dict[str, Notification] = field(default_factory=dict)
    config: AlertConfig | None = None

    @classmethod
    def of(
        cls, episodes: Iterable[Episode] = (), silences: Iterable[Silence] = (),
        notifications: Iterable[Notification] = (),
    ) -> AlertView:  # fmt: skip
        """A view holding these rows (as a projection read them back)."""
        view = cls()
        for ep in episodes:
            view.episodes[ep.id] = ep
            if ep.state != RESOLVED:
                view.open[ep.fingerprint] = ep.id
        view.silences = {s.id: s for s in silences}
        view.notifications = {n.id: n for n in notifications}
        return view

    def open_episode(self, fingerprint: str) -> Episode | None:
        eid = self.open.get(fingerprint)
        return None if eid is None else self.episodes[eid]

    def apply(self, e: Event) -> None:
        """Fold one event (any type: those not about alerts change nothing)."""
        match e:
            case AlertPending() | AlertFiring():
                self._activate(e)
            case AlertResolved():
                # The episode it names: a repeated record of an earlier one's end does
                # not end the alert's next episode.
                ep = self.open_episode(e.fingerprint)
                if ep is not None and ep.id == episode_id(e.fingerprint, e.active_since):
                    self._close(ep, e.ts, e.reason)
            case AlertInhibited():
                if (ep := self.open_episode(e.fingerprint)) is not None:
                    ep.inhibited_by, ep.inhibited_by_rule, ep.inhibited_reason = (
                        e.by, e.by_rule, e.reason)  # fmt: skip
            case AlertUninhibited():
                # Only by the alert that mutes it: one muted by another since stays muted.
                ep = self.open_episode(e.fingerprint)
                if ep is not None and ep.inhibited_by == e.by:
                    ep.inhibited_by, ep.inhibited_by_rule, ep.inhibited_reason = None, "", ""
            case AlertAcknowledged():
                if (ep := self.open_episode(e.fingerprint)) is not None:
                    ep.acknowledged_by, ep.acknowledged_at = e.author, e.ts
                    ep.acknowledged_comment = e.comment
            case SilenceCreated():
                if e.silence_id not in self.silences:
                    self.silences[e.silence_id] = Silence(
                        e.silence_id, e.tenant, [dict(m) for m in e.matchers], e.starts_at,
                        e.ends_at, e.created_by, e.comment, created_at=e.ts)  # fmt: skip
            case SilenceExpired():
                s = self.silences.get(e.silence_id)
                if s is not None and s.expired_at is None:
                    s.expired_at, s.expired_by, s.expire_reason = e.ts, e.expired_by, e.reason
            case NotificationDue():
                if e.notification_id not in self.notifications:
                    self.notifications[e.notification_id] = Notification(
                        e.notification_id, e.tenant, e.receiver, e.group_key,
                        dict(e.group_labels), _fingerprints(e.firing),
                        _fingerprints(e.resolved), e.epoch, e.severity, due_at=e.ts,
                    )  # fmt: skip
            case NotificationSent():
                if (n := self.notifications.get(e.notification_id)) is not None:
                    n.state, n.sent_at, n.attempts = SENT, e.ts, e.attempt
                    n.detail, n.out_of_band = e.detail, e.out_of_band
                    n.next_attempt_at = None
            case NotificationFailed():
                n = self.notifications.get(e.notification_id)
                if n is not None and n.state != SENT:  # a late failure does not undo a send
                    n.attempts, n.last_error = e.attempt, e.error
                    n.next_attempt_at = e.next_attempt_at or None
                    n.state = RETRYING if e.next_attempt_at else FAILED
            case AlertRulesLoaded():
                self.config = AlertConfig(e.digest, e.source, e.ts)
            case _:
                pass  # HubSampled, and every event not about alerts: nothing kept

    def _activate(self, e: AlertPending | AlertFiring) -> None:
        eid = episode_id(e.fingerprint, e.active_since)
        firing = isinstance(e, AlertFiring)
        current = self.open_episode(e.fingerprint)
        if current is not None and current.id == eid:
            current.rule, current.severity = e.rule, e.severity
            current.labels, current.annotations = dict(e.labels), dict(e.annotations)
            current.value = e.value
            if firing and current.state == PENDING:
                current.state, current.fired_at = FIRING, e.ts
            return
        if eid in self.episodes:
            return  # an episode once closed stays closed (the record repeated)
        if current is not None:
            self._close(current, e.ts, SUPERSEDED)
        self.episodes[eid] = Episode(
            eid, e.fingerprint, e.tenant, e.rule, e.severity, FIRING if firing else PENDING,
            dict(e.labels), dict(e.annotations), e.active_since, value=e.value,
            fired_at=e.ts if firing else None,
        )  # fmt: skip
        self.open[e.fingerprint] = eid

    def _close(self, ep: Episode, at: float, reason: str) -> None:
        ep.state, ep.resolved_at, ep.resolve_reason = RESOLVED, at, reason
        del self.open[ep.fingerprint]


def _fingerprints(alerts: list[dict[str, object]]) -> list[str]:
    return [str(a.get("fingerprint", "")) for a in alerts]


# --- silences at a moment (computed when asked, never stored) -----------------------------


def silence_state(s: Silence, now: float) -> str:
    """``pending`` (not started), ``active`` or ``expired`` (ended, or expired early)."""
    if (s.expired_at is not None and s.expired_at <= now) or now >= s.ends_at:
        return "expired"
    return "active" if s.starts_at <= now else "pending"


def silence_matchers(s: Silence) -> list[Matcher] | None:
    """A silence's matchers, or None when one is not a matcher (an unknown operator, a
    regex that does not compile): such a silence silences nothing."""
    try:
        matchers = [msgspec.convert(m, Matcher) for m in s.matchers]
        for m in matchers:
            if m.op in ("=~", "!~"):
                re.compile(m.value)
    except (msgspec.ValidationError, re.error):
        return None
    return matchers


def silenced_by(labels: Mapping[str, str], silences: Iterable[Silence], now: float) -> list[str]:
    """The ids (sorted) of the silences active at ``now`` whose every matcher matches
    ``labels``."""
    out = []
    for s in silences:
        if silence_state(s, now) == "active":
            matchers = silence_matchers(s)
            if matchers is not None and matches_all(matchers, labels):
                out.append(s.id)
    return sorted(out)
