"""The alert history the views keep (``projections.alert_view``): episodes of each alert,
silences and notifications, folded from the alert events; and the projection's way of
folding a batch over only the rows it touches, held to the whole fold."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from events.model import Event
from projections.alert_view import (
    FIRING,
    PENDING,
    RESOLVED,
    SUPERSEDED,
    AlertView,
    episode_id,
    keys_of,
    silence_state,
    silenced_by,
)
from projections.fold import fold_view
from projections.postgres_render import (
    ALERT_COLUMNS,
    NOTIFICATION_COLUMNS,
    SILENCE_COLUMNS,
    alert_from_pg,
    notification_from_pg,
    pg_alert_row,
    pg_notification_row,
    pg_silence_row,
    silence_from_pg,
)
from tests.integration.conftest import (
    ALERT_T0,
    alert_acknowledged,
    alert_firing,
    alert_inhibited,
    alert_pending,
    alert_resolved,
    alert_uninhibited,
    notification_due,
    notification_failed,
    notification_sent,
    silence_created,
    silence_expired,
)
from tests.strategies import ALERTS


def alerts_of(*events: Event) -> AlertView:
    return fold_view(events).alerts


def test_an_episode_from_pending_to_resolved():
    """Pending opens an episode; firing fires it (``fired_at``); inhibited sets who mutes
    it; uninhibited by another alert changes nothing, by that one clears it; an
    acknowledgement is kept; resolved closes it, and it stays in the history."""
    since = ALERT_T0 + 1
    steps: list[tuple[Event, dict[str, Any]]] = [
        (alert_pending("f1", 1), {"state": PENDING, "fired_at": None}),
        (alert_firing("f1", 5, since=since), {"state": FIRING, "fired_at": ALERT_T0 + 5}),
        (alert_inhibited("f1", 6, by="root"),
         {"inhibited_by": "root", "inhibited_reason": "root is down"}),
        (alert_uninhibited("f1", 7, by="other"), {"inhibited_by": "root"}),
        (alert_uninhibited("f1", 8, by="root"), {"inhibited_by": None, "inhibited_by_rule": ""}),
        (alert_acknowledged("f1", 9, author="ana"),
         {"acknowledged_by": "ana", "acknowledged_at": ALERT_T0 + 9}),
        (alert_resolved("f1", 12, since=since), {"state": RESOLVED, "resolved_at": ALERT_T0 + 12,
                                                 "resolve_reason": "condition cleared"}),
    ]  # fmt: skip
    done: list[Event] = []
    for event, fields in steps:
        done.append(event)
        view = alerts_of(*done)
        (ep,) = view.episodes.values()
        assert ep.id == episode_id("f1", since) and ep.active_since == since
        assert {k: getattr(ep, k) for k in fields} == fields, type(event).__name__
    assert view.open == {}
    assert ep.fired_at == ALERT_T0 + 5 and ep.acknowledged_by == "ana"


def test_firing_without_pending_opens_a_firing_episode_and_the_next_one_is_new():
    """A rule without ``for`` fires at once: the episode opens firing. Once resolved, the
    alert's next activation is a new episode beside it; a resolved record repeated, or
    a late event of the closed episode, changes nothing."""
    first, second = ALERT_T0 + 1, ALERT_T0 + 20
    events = [alert_firing("f1", 1), alert_resolved("f1", 10, since=first),
              alert_firing("f1", 20), alert_resolved("f1", 10, since=first),
              alert_pending("f1", 15, since=first), alert_firing("f1", 1)]  # fmt: skip
    view = alerts_of(*events)
    old, new = view.episodes[episode_id("f1", first)], view.episodes[episode_id("f1", second)]
    assert (old.state, old.fired_at, old.resolved_at) == (RESOLVED, first, ALERT_T0 + 10)
    assert (new.state, new.fired_at, new.resolved_at) == (FIRING, second, None)
    assert view.open == {"f1": new.id}


def test_a_new_episode_while_one_is_open_supersedes_it():
    """An alert with an open episode that the log says became active again (another
    ``active_since``) has the old episode closed at that moment, said superseded."""
    view = alerts_of(alert_pending("f1", 1), alert_firing("f1", 30))
    old = view.episodes[episode_id("f1", ALERT_T0 + 1)]
    assert (old.state, old.resolved_at, old.resolve_reason) == (RESOLVED, ALERT_T0 + 30, SUPERSEDED)
    assert view.open == {"f1": episode_id("f1", ALERT_T0 + 30)}


def test_events_of_an_alert_with_no_open_episode_are_ignored():
    """Resolved, inhibited, uninhibited, acknowledged of an alert that has no open episode
    (never opened, or closed) leave the history as it was."""
    closed = [alert_firing("f1", 1), alert_resolved("f1", 2, since=ALERT_T0 + 1)]
    before = alerts_of(*closed)
    for late in (alert_resolved("f2", 3, since=ALERT_T0), alert_inhibited("f1", 4, by="x"),
                 alert_uninhibited("f1", 5, by="x"), alert_acknowledged("f1", 6)):  # fmt: skip
        assert alerts_of(*closed, late) == before, type(late).__name__


DOWN = [{"name": "alertname", "op": "=", "value": "ServiceDown"}]


def test_silences_are_active_between_their_start_and_end_unless_expired_early():
    """A silence is pending before ``starts_at``, active until ``ends_at`` (excluded) or
    until it is expired early, expired after; ``silenced_by`` lists the silences active
    at that moment whose every matcher matches the labels. A silence created again under
    the same id, or expired twice, keeps its first record."""
    start, end = ALERT_T0 + 100, ALERT_T0 + 200
    view = alerts_of(
        silence_created("s1", 1, matchers=DOWN, starts_at=start, ends_at=end),
        silence_created("s2", 2, starts_at=start, ends_at=end,
                        matchers=[*DOWN, {"name": "service", "op": "=~", "value": "svc-.*"}]),
        silence_created("s3", 3, matchers=[{"name": "severity", "op": "=", "value": "info"}],
                        starts_at=start, ends_at=end),
        silence_created("s1", 4, matchers=[], starts_at=0, ends_at=1),
    )  # fmt: skip
    labels = {"alertname": "ServiceDown", "service": "svc-0", "severity": "critical"}
    silences = view.silences.values()
    assert view.silences["s1"].matchers == DOWN
    assert [silence_state(view.silences["s1"], t) for t in (start - 1, start, end - 1, end)] == [
        "pending", "active", "active", "expired"]  # fmt: skip
    assert silenced_by(labels, silences, start - 1) == []
    assert silenced_by(labels, silences, start) == ["s1", "s2"]
    assert silenced_by({**labels, "service": "db"}, silences, start) == ["s1"]
    assert silenced_by(labels, silences, end) == []

    expired = alerts_of(
        silence_created("s1", 1, matchers=DOWN, starts_at=start, ends_at=end),
        silence_expired("s1", 150),
        silence_expired("s1", 180),
    ).silences["s1"]
    assert expired.expired_at == ALERT_T0 + 150 and expired.expire_reason == "expired early"
    assert silence_state(expired, ALERT_T0 + 149) == "active"
    assert silence_state(expired, ALERT_T0 + 150) == "expired"
    assert silenced_by(labels, [expired], ALERT_T0 + 150) == []


def test_a_silence_with_a_matcher_that_is_not_one_silences_nothing():
    """A matcher with an unknown operator or a regex that does not compile: the silence
    silences nothing (rather than everything, or failing the query)."""
    for bad in ({"name": "alertname", "op": "==", "value": "x"},
                {"name": "alertname", "op": "=~", "value": "("}):  # fmt: skip
        view = alerts_of(silence_created("s1", 1, matchers=[bad], starts_at=0, ends_at=2e9))
        assert silenced_by({"alertname": "x"}, view.silences.values(), ALERT_T0) == []


def test_a_notification_from_due_to_sent_or_given_up():
    """Due, then a failed try (retrying, with the next attempt), then sent; a failure
    recorded after the send does not undo it. Another, failed with no next attempt: given
    up. Sent or failed of a notification never due: ignored; due again: ignored."""
    view = alerts_of(
        notification_due("n1", 1, firing=["f1", "f2"], resolved=("f3",)),
        notification_failed("n1", 2, attempt=1, next_attempt_at=ALERT_T0 + 5),
    )
    n = view.notifications["n1"]
    assert (n.state, n.attempts, n.last_error, n.next_attempt_at) == (
        "retrying", 1, "timed out", ALERT_T0 + 5)  # fmt: skip
    assert (n.firing, n.resolved, n.due_at) == (["f1", "f2"], ["f3"], ALERT_T0 + 1)
    view = alerts_of(
        notification_due("n1", 1, firing=["f1"]),
        notification_failed("n1", 2, attempt=1, next_attempt_at=ALERT_T0 + 5),
        notification_sent("n1", 6, attempt=2),
        notification_failed("n1", 7, attempt=3, next_attempt_at=0.0),
        notification_due("n1", 8, firing=["f9"]),
        notification_due("n2", 9, firing=["f1"]),
        notification_failed("n2", 10, attempt=1, next_attempt_at=0.0),
        notification_sent("n3", 11),
    )
    n1, n2 = view.notifications["n1"], view.notifications["n2"]
    assert (n1.state, n1.sent_at, n1.attempts) == ("sent", ALERT_T0 + 6, 2)
    assert n1.next_attempt_at is None
    assert n1.firing == ["f1"]
    assert (n2.state, n2.next_attempt_at) == ("failed", None)
    assert set(view.notifications) == {"n1", "n2"}


# --- the projection's fold of a batch over the rows it touches ----------------------------


def _row(columns: tuple[str, ...], row: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(columns, row, strict=True))


_OPENED = [alert_pending("f1", 1), alert_firing("f1", 2, since=ALERT_T0 + 1),
           alert_inhibited("f1", 3, by="f2"), alert_firing("f2", 4),
           silence_created("s1", 5, matchers=DOWN, starts_at=0, ends_at=2e9),
           notification_due("n1", 6, firing=["f1"])]  # fmt: skip


@settings(max_examples=400)
@given(st.lists(ALERTS, max_size=25), st.lists(ALERTS, max_size=15))
# Each kind of event that changes a row a batch does not create, alone in its batch.
@example(_OPENED, [alert_uninhibited("f1", 7, by="f2")])
@example(_OPENED, [alert_acknowledged("f1", 7)])
@example(_OPENED, [alert_resolved("f1", 7, since=ALERT_T0 + 1)])
@example(_OPENED, [alert_firing("f1", 7)])  # supersedes the open episode
@example([*_OPENED, alert_resolved("f2", 7, since=ALERT_T0 + 4)], [alert_firing("f2", 4)])
@example(_OPENED, [silence_expired("s1", 7)])
@example(_OPENED, [notification_failed("n1", 7, attempt=1, next_attempt_at=0.0)])
@example(_OPENED, [notification_sent("n1", 7)])
def test_folding_a_batch_over_the_rows_it_touches_gives_the_whole_fold(
    history: list[Event], batch: list[Event]
) -> None:
    """What the PostgreSQL projection does: read back (as rows) only what ``keys_of`` the
    batch names - the open episodes of its alerts, the episodes, silences and
    notifications it names - fold the batch over them, write them. Every row it holds
    then renders as in the fold of the whole log, and every row it did not read is one
    the batch did not change."""
    held = alerts_of(*history)
    whole = alerts_of(*history, *batch)
    keys = keys_of(batch)
    episodes = [ep for ep in held.episodes.values() if ep.id in keys.episodes
                or (ep.fingerprint in keys.fingerprints and ep.state != RESOLVED)]  # fmt: skip
    part = AlertView.of(
        [alert_from_pg(_row(ALERT_COLUMNS, pg_alert_row(ep))) for ep in episodes],
        [silence_from_pg(_row(SILENCE_COLUMNS, pg_silence_row(s)))
         for s in held.silences.values() if s.id in keys.silences],
        [notification_from_pg(_row(NOTIFICATION_COLUMNS, pg_notification_row(n)))
         for n in held.notifications.values() if n.id in keys.notifications],
    )  # fmt: skip
    for e in batch:
        part.apply(e)
    tables: tuple[tuple[Callable[[Any], tuple[Any, ...]], dict[str, Any], dict[str, Any],
                        dict[str, Any]], ...] = (
        (pg_alert_row, part.episodes, held.episodes, whole.episodes),
        (pg_silence_row, part.silences, held.silences, whole.silences),
        (pg_notification_row, part.notifications, held.notifications, whole.notifications),
    )  # fmt: skip
    for render, mine, before, after in tables:
        assert set(mine) | set(before) == set(after)
        for k, row in after.items():
            source = mine if k in mine else before
            assert render(source[k]) == render(row), k
