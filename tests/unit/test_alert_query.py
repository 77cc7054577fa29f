"""``hub.query.alerts`` requests (pure): what a request asks for, and the clear error a
bad one gets (``projections.alert_read.alert_filter``, ``parse_matcher``,
``parse_time``)."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from events.wire import AlertsQuery, WireError, parse_query
from handlers.alert_rules import Matcher
from projections.alert_read import alert_filter, parse_matcher, parse_time


def filter_of(**request: object):  # type: ignore[no-untyped-def]
    return alert_filter(parse_query(msgspec.json.encode(request), AlertsQuery))


def refused(**request: object) -> str:
    """The reason a request is refused (INVALID_REQUEST)."""
    with pytest.raises(WireError) as caught:
        filter_of(**request)
    assert caught.value.code == "INVALID_REQUEST"
    return caught.value.reason


@pytest.mark.parametrize(("text", "matcher"), [
    ('severity="critical"', Matcher("severity", "=", "critical")),
    ("service!=orders", Matcher("service", "!=", "orders")),
    (' alertname =~ "Service.*" ', Matcher("alertname", "=~", "Service.*")),
    ('component!~"kafka|pg"', Matcher("component", "!~", "kafka|pg")),
    ('summary="say \\"hi\\", twice"', Matcher("summary", "=", 'say "hi", twice')),
    ('service=""', Matcher("service", "=", "")),
    ("service=~svc-.*", Matcher("service", "=~", "svc-.*")),
])  # fmt: skip
def test_matchers_are_read_as_alertmanager_writes_them(text: str, matcher: Matcher) -> None:
    """The four operators, values quoted (with JSON escapes) or plain words."""
    assert parse_matcher(text) == matcher


@pytest.mark.parametrize(("text", "why"), [
    ("severity", "expected a matcher"),
    ("sev erity=x", "expected a matcher"),
    ('severity=="critical"', "quote the value"),
    ("service=a b", "quote the value"),
    ('service="orders', "malformed quoted value"),
    ('service=~"("', "invalid regex"),
])  # fmt: skip
def test_a_bad_matcher_is_refused_with_its_place_and_why(text: str, why: str) -> None:
    reason = refused(matchers=['severity="critical"', text])
    assert reason.startswith("matchers[1]: ") and why in reason, reason


def test_matchers_as_objects() -> None:
    """``{name, op, value}`` objects: the operator must be one of the four (the wire
    refuses another), a regex must compile."""
    f = filter_of(matchers=[{"name": "service", "op": "=~", "value": "svc-[0-9]"}])
    assert f.matchers == (Matcher("service", "=~", "svc-[0-9]"),)
    with pytest.raises(WireError, match=r"matchers\[0\]\.op"):
        filter_of(matchers=[{"name": "service", "op": "==", "value": "x"}])
    assert "invalid regex" in refused(matchers=[{"name": "a", "op": "!~", "value": "["}])


def test_states_per_include_with_their_defaults() -> None:
    """Alerts default to the active ones (pending and firing), notifications to all,
    silences to the active ones; a state another ``include`` has is refused, naming the
    ones it has."""
    assert filter_of().states == ("pending", "firing")
    assert filter_of(state="all").states is None
    assert filter_of(state="resolved").states == ("resolved",)
    assert filter_of(include="notifications").states is None
    assert filter_of(include="notifications", state="retrying").states == ("retrying",)
    assert filter_of(include="silences").states == ("active",)
    reason = refused(include="notifications", state="firing")
    assert reason.startswith("state: 'firing' is not a state of notifications"), reason
    assert "due, sent, retrying, failed" in reason
    assert refused(state="on fire").startswith("state: ")


def test_silences_are_filtered_by_state_only() -> None:
    assert refused(include="silences", labels={"a": "b"}, severity="x").startswith(
        "severity, labels: silences are filtered by state only"
    )


def test_times_are_iso_8601_or_epoch_seconds() -> None:
    """ISO 8601 with a zone, without one (UTC), or seconds since the epoch as a number or
    a string; anything else is refused naming the field; since after until too."""
    at = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
    for given in ("2025-06-15T12:00:00Z", "2025-06-15T14:00:00+02:00", "2025-06-15T12:00:00",
                  at.timestamp(), str(at.timestamp()), int(at.timestamp())):  # fmt: skip
        assert parse_time(given, "since") == at, given  # type: ignore[arg-type]
    assert filter_of(since="2025-06-15T12:00:00Z", until=at.timestamp() + 1).since == at
    assert refused(until="yesterday").startswith("until: 'yesterday' is not an ISO 8601 time")
    assert refused(since="1e30").startswith("since: ")
    assert refused(since=at.timestamp() + 1, until=at.timestamp()) == "since: after until"


def test_the_wire_refuses_unknown_fields_and_limits() -> None:
    """Unknown fields, a ``limit`` over 1,000 and an unknown ``include`` are refused by
    the wire contract with the field's path."""
    cases = (({"state": "all", "colour": "red"}, "`colour`"), ({"limit": 1001}, "`$.limit`"),
             ({"include": "rules"}, "`$.include`"))  # fmt: skip
    for body, where in cases:
        with pytest.raises(WireError) as caught:
            filter_of(**body)
        assert caught.value.code == "INVALID_REQUEST" and where in caught.value.reason
