"""Every event type is in the one union, and handled wherever every type must be.

Adding an event type is its class (with its ``kind``) and a line in ``AnyEvent``; the
lists of types derive from the union. These tests fail until the places that must
handle each type do (the codec's round trip and the reactions have their own coverage
tests, in test_codec and test_handlers).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.model import (
    ALERT_EVENTS,
    EVENT_TYPES,
    HEALTH_EVENTS,
    WATCH_KIND,
    Event,
    HeartbeatReceived,
    HubSampled,
    InfraChecked,
    InfraConfigLoaded,
    ServiceRegistered,
    compaction_key,
    partition_key,
    superseded_subject,
)
from events.subjects import watch_subject
from projections.fold import fold_view
from projections.postgres_render import HISTORY_COLUMNS, POSTGRES_RENDERING, pg_history_row
from projections.redis_render import REDIS_RENDERING
from tests.strategies import ALERT_STRATEGIES, ALERTS, EVENTS

_PLAIN: dict[Any, Any] = {str: "x", int: 1, float: 1.0, list[dict[str, str]]: []}


def example(t: type[Event], **given: Any) -> Event:
    """An event of type ``t``: ``given`` fields, every other required one a plain value."""
    for f in msgspec.structs.fields(t):
        if f.required and f.name not in given:
            given[f.name] = _PLAIN[f.type]
    return t(**given)


def _subclasses(cls: type[Event]) -> set[type[Event]]:
    return {s for c in cls.__subclasses__() for s in {c, *_subclasses(c)}}


def test_every_event_class_is_in_the_union():
    """An event class of the contract left out of ``AnyEvent`` could be recorded but
    never decoded."""
    contract = {t for t in _subclasses(Event) if t.__module__.startswith("events.")}
    assert contract == set(EVENT_TYPES)


def test_every_event_type_names_its_own_watch_kind():
    """Each type sets its ``kind`` itself (not inherited), a distinct single subject token."""
    for t in EVENT_TYPES:
        assert "kind" in vars(t), f"{t.__name__} names no kind"
        assert re.fullmatch(r"[a-z][a-z_]*", t.kind), t.kind
        assert watch_subject("acme", t.kind).split(".") == ["hub", "events", "acme", t.kind]
    assert len(set(WATCH_KIND.values())) == len(EVENT_TYPES)


@pytest.mark.parametrize("t", EVENT_TYPES, ids=lambda t: t.__name__)
def test_the_health_history_holds_exactly_the_health_events_under_their_kind(t):
    """The views keep every health event (and only those) in the health history, each
    rendered with its type's kind; any other type is refused by the renderer."""
    event = example(t)
    view = fold_view([event])
    if t in HEALTH_EVENTS:
        assert list(view.history.values()) == [event]
        assert pg_history_row(event)[HISTORY_COLUMNS.index("kind")] == t.kind
    else:
        assert view.history == {}
        with pytest.raises(TypeError):
            pg_history_row(event)


# For each type the log supersedes, what must come before an example of it for the views
# to show it (a registration, a configuration); a type missing here fails below.
_SUPERSEDED = {
    HeartbeatReceived: lambda: [
        example(ServiceRegistered, tenant="acme", service_name="orders", instance_id="i-1"),
        example(HeartbeatReceived, tenant="acme", service_name="orders", instance_id="i-1"),
    ],
    InfraChecked: lambda: [
        example(InfraConfigLoaded, tenant="_infra", components=[{"name": "pg"}]),
        example(InfraChecked, tenant="_infra", component="pg", status="HEALTHY"),
    ],
}


# Superseded types no view shows anything of: nothing for verify to forgive.
_NOT_SHOWN = {HubSampled}


def test_the_types_the_log_supersedes_are_known_to_replay():
    """Every type with a compaction key (and only those) names the subject it is the
    latest record of, which replay treats as moved; each is covered below."""
    superseded = {t for t in EVENT_TYPES if compaction_key(example(t)) is not None}
    assert superseded == set(_SUPERSEDED) | _NOT_SHOWN
    for t in EVENT_TYPES:
        assert (superseded_subject(example(t)) is None) == (t not in superseded)


@pytest.mark.parametrize("t", list(_SUPERSEDED), ids=lambda t: t.__name__)
def test_a_superseded_event_names_the_row_its_fields_live_in(t):
    """``superseded_subject`` is how ``volatile_of`` names the rows and keys that the
    event's fields land in (in both views), so ``hub verify`` forgives exactly those."""
    events = _SUPERSEDED[t]()
    view = fold_view(events)
    subject = superseded_subject(events[-1])
    named = [
        rendering.volatile_of(k) == subject
        for rendering in (POSTGRES_RENDERING, REDIS_RENDERING)
        for k in rendering.expected(view)
    ]
    assert sum(named) == 2  # a row and a key


@pytest.mark.parametrize("t", sorted(_NOT_SHOWN, key=lambda t: t.__name__),
                         ids=lambda t: t.__name__)  # fmt: skip
def test_a_superseded_event_no_view_shows_changes_no_line(t):
    """A type the log supersedes but no view shows leaves both views' renderings as
    they were, so a newer one past a checkpoint can make no line differ."""
    events = _SUPERSEDED[HeartbeatReceived]()
    for rendering in (POSTGRES_RENDERING, REDIS_RENDERING):
        assert rendering.expected(fold_view([*events, example(t)])) == rendering.expected(
            fold_view(events)
        )


@settings(max_examples=200)
@given(st.data())
def test_every_alerting_event_shares_one_partition_key(data):
    """Alerts, silences, notifications and rule loads are keyed alike whatever their
    tenants, so a keyed log keeps them in one order (the alert fold depends on their
    order across alerts: a group's notification lists several); the hub's samples and
    every other event are keyed apart from them."""
    alerting = set(ALERT_EVENTS) - {HubSampled}
    a = data.draw(st.sampled_from(list(ALERT_STRATEGIES.values())).flatmap(lambda s: s))
    b = data.draw(st.one_of(EVENTS, ALERTS))
    if type(a) in alerting:
        assert (partition_key(a) == partition_key(b)) == (type(b) in alerting), (a, b)


def _one(field: str, value: str) -> str:
    return "" if field == "digest" else value  # every configuration load is about one thing
