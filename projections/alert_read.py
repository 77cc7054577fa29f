"""Reads of the alert history in the PostgreSQL view (``hub.query.alerts``).

A request becomes an ``AlertFilter`` first (``alert_filter``, pure: a bad state, time
or matcher is an ``INVALID_REQUEST`` naming the field); the reads then answer it from
the ``alerts``, ``alert_notifications`` and ``alert_silences`` tables, newest first,
as the query shows them (times in ISO 8601 UTC). Equality filters run in SQL; label
matchers (Alertmanager's regexes, anchored) in Python on the rows SQL returns, a chunk
at a time, so an answer examines SCAN_BUDGET rows at most. An alert's ``silenced_by``
is computed when asked, from the silences active at that moment
(``alert_view.silenced_by``): it is not stored, because time alone changes it.

A tenant sees its own alerts and notifications and those of the shared pseudo-tenants
(``_infra``: the infrastructure every tenant uses; ``_hub``: the hub itself), as the
infrastructure query shows every tenant the same components.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from events.names import HUB_TENANT, INFRA_TENANT
from events.wire import AlertsQuery, MatcherArg, WireError
from handlers.alert_rules import Matcher, matches_all
from handlers.alert_syntax import make_matcher
from handlers.alert_syntax import parse_matcher as text_matcher
from projections.alert_view import (
    ACTIVE,
    DUE,
    FAILED,
    FIRING,
    PENDING,
    RESOLVED,
    RETRYING,
    SENT,
    silence_state,
    silenced_by,
)
from projections.canonical import from_json
from projections.postgres_render import (
    ALERT_COLUMNS,
    NOTIFICATION_COLUMNS,
    SILENCE_COLUMNS,
    silence_from_pg,
    ts,
)

SHARED_TENANTS = (INFRA_TENANT, HUB_TENANT)
# What each ``include`` accepts as ``state`` (None: no condition), its default first.
STATES: dict[str, dict[str, tuple[str, ...] | None]] = {
    "alerts": {"active": ACTIVE, "firing": (FIRING,), "pending": (PENDING,),
               "resolved": (RESOLVED,), "all": None},
    "notifications": {"all": None, "due": (DUE,), "sent": (SENT,), "retrying": (RETRYING,),
                      "failed": (FAILED,)},
    "silences": {"active": ("active",), "pending": ("pending",), "expired": ("expired",),
                 "all": None},
}  # fmt: skip
SCAN_BUDGET = 5_000  # rows one answer examines at most (matchers filter after SQL)
SCAN_CHUNK = 500


@dataclass(frozen=True)
class AlertFilter:
    """A valid ``hub.query.alerts`` request."""

    include: str
    states: tuple[str, ...] | None
    severity: str | None = None
    labels: dict[str, str] | None = None
    matchers: tuple[Matcher, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100


def _invalid(reason: str) -> WireError:
    return WireError("INVALID_REQUEST", reason)


def alert_filter(q: AlertsQuery) -> AlertFilter:
    """The filter a request asks for.

    Raises:
        WireError: INVALID_REQUEST, naming the field (a state the ``include`` does not
            have, a time that is not one, a matcher that is not one, a filter that does
            not apply to silences).
    """
    states = STATES[q.include]
    state = q.state if q.state is not None else next(iter(states))
    if state not in states:
        raise _invalid(f"state: {state!r} is not a state of {q.include} "
                       f"(one of {', '.join(states)})")  # fmt: skip
    if q.include == "silences":
        filters = (("severity", q.severity), ("labels", q.labels), ("matchers", q.matchers),
                   ("since", q.since), ("until", q.until))  # fmt: skip
        given = [name for name, v in filters if v]
        if given:
            raise _invalid(f"{', '.join(given)}: silences are filtered by state only")
    matchers = tuple(parse_matcher(m, f"matchers[{i}]") for i, m in enumerate(q.matchers))
    since, until = parse_time(q.since, "since"), parse_time(q.until, "until")
    if since is not None and until is not None and since > until:
        raise _invalid("since: after until")
    return AlertFilter(q.include, states[state], q.severity, dict(q.labels) or None, matchers,
                       since, until, q.limit)  # fmt: skip


def parse_matcher(given: str | MatcherArg, where: str = "matcher") -> Matcher:
    """A label matcher from its string form (``name="value"``, ``name!="v"``,
    ``name=~"re"``, ``name!~"re"``, as the rules file reads them:
    ``handlers.alert_syntax``) or its object form; a regex must compile.

    Raises:
        WireError: INVALID_REQUEST, naming ``where``.
    """
    try:
        if isinstance(given, MatcherArg):
            return make_matcher(given.name, given.op, given.value)
        return text_matcher(given)
    except ValueError as exc:
        raise _invalid(f"{where}: {exc}") from None


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def parse_time(value: str | float | None, where: str) -> datetime | None:
    """A time given as ISO 8601 (without a zone: UTC) or seconds since the epoch (a
    number, or a string of one).

    Raises:
        WireError: INVALID_REQUEST, naming ``where``.
    """
    if value is None:
        return None
    try:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, str):
            at = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
        return ts(value)
    except (ValueError, OverflowError, OSError):
        raise _invalid(f"{where}: {value!r} is not an ISO 8601 time nor seconds since the "
                       "epoch") from None  # fmt: skip


# --- reads -----------------------------------------------------------------------------------


def iso(at: datetime | None) -> str | None:
    """A time as the query answers show it (ISO 8601, UTC, ``Z``)."""
    return None if at is None else at.astimezone(UTC).isoformat().replace("+00:00", "Z")


class _Where:
    """SQL conditions and their parameters, numbered as they are added."""

    def __init__(self, conditions: Sequence[str] = (), params: Sequence[Any] = ()) -> None:
        self.conditions = list(conditions)
        self.params = list(params)

    def add(self, condition: str, *values: Any) -> None:
        """``condition`` with each ``{}`` standing for one of ``values``, in turn."""
        numbers = range(len(self.params) + 1, len(self.params) + len(values) + 1)
        self.conditions.append(condition.format(*(f"${n}" for n in numbers)))
        self.params.extend(values)

    def sql(self) -> str:
        return " AND ".join(self.conditions) or "true"


def _scoped(f: AlertFilter, tenant: str, labels_column: str, time_column: str) -> _Where:
    where = _Where()
    where.add("tenant_id = ANY({}::text[])", [tenant, *SHARED_TENANTS])
    if f.states is not None:
        where.add("state = ANY({}::text[])", list(f.states))
    if f.severity is not None:
        where.add("severity = {}", f.severity)
    if f.labels:
        where.add(f"{labels_column} @> {{}}::jsonb", msgspec.json.encode(f.labels).decode())
    if time_column == "due_at":
        if f.since is not None:
            where.add("due_at >= {}", f.since)
        if f.until is not None:
            where.add("due_at <= {}", f.until)
    else:  # alerts active at some time between since and until
        if f.since is not None:
            where.add("(resolved_at IS NULL OR resolved_at >= {})", f.since)
        if f.until is not None:
            where.add("active_since <= {}", f.until)
    return where


Keep = Callable[[asyncpg.Record], bool]


async def _scan(
    conn: asyncpg.Connection, table: str, columns: Sequence[str], where: _Where,
    order: tuple[str, str], keep: Keep | None, limit: int,
) -> tuple[list[asyncpg.Record], bool]:  # fmt: skip
    """Rows of ``table`` meeting ``where`` and ``keep`` (Python), newest first by
    ``order`` (time column, key), ``limit`` at most; and whether more may be left (more
    rows, or SCAN_BUDGET rows examined)."""
    at, key = order
    out: list[asyncpg.Record] = []
    after: tuple[Any, Any] | None = None
    scanned = 0
    while True:
        page = _Where(where.conditions, where.params)
        if after is not None:
            page.add(f"({at}, {key}) < ({{}}, {{}})", *after)
        chunk = limit + 1 if not keep else min(SCAN_CHUNK, SCAN_BUDGET - scanned)
        rows = await conn.fetch(
            f"SELECT {', '.join(columns)} FROM {table} WHERE {page.sql()}"
            f" ORDER BY {at} DESC, {key} DESC LIMIT {chunk}", *page.params,
        )  # fmt: skip
        for row in rows:
            scanned += 1
            if keep and not keep(row):
                continue
            if len(out) == limit:
                return out, True
            out.append(row)
        if len(rows) < chunk:
            return out, False
        if scanned >= SCAN_BUDGET:
            return out, True
        after = (rows[-1][at], rows[-1][key])


def _matching(matchers: tuple[Matcher, ...], column: str) -> Keep | None:
    """Keep the rows whose labels (jsonb ``column``) every matcher matches."""
    if not matchers:
        return None
    return lambda row: matches_all(matchers, from_json(row[column]))


async def read_active_silences(conn: asyncpg.Connection, now: float) -> list[Any]:
    """Every silence active at ``now`` (whatever its tenant: matchers say what it
    silences), as ``alert_view.Silence``."""
    at = ts(now)
    rows = await conn.fetch(
        f"SELECT {', '.join(SILENCE_COLUMNS)} FROM alert_silences WHERE starts_at <= $1"
        " AND ends_at > $1 AND (expired_at IS NULL OR expired_at > $1)", at,
    )  # fmt: skip
    return [s for s in map(silence_from_pg, rows) if silence_state(s, at.timestamp()) == "active"]


async def read_alerts(
    conn: asyncpg.Connection, tenant: str, f: AlertFilter, now: float
) -> tuple[list[dict[str, Any]], bool]:
    """The alert episodes ``f`` asks for, newest first, each with its ``silenced_by`` at
    ``now``; and whether more may be left."""
    where = _scoped(f, tenant, "labels", "active_since")
    rows, more = await _scan(conn, "alerts", ALERT_COLUMNS, where, ("active_since", "id"),
                             _matching(f.matchers, "labels"), f.limit)  # fmt: skip
    silences = await read_active_silences(conn, now) if rows else []
    at = ts(now).timestamp()
    out = []
    for r in rows:
        labels = from_json(r["labels"])
        out.append({
            "id": r["id"], "fingerprint": r["fingerprint"], "rule": r["rule"],
            "severity": r["severity"], "state": r["state"], "tenant": r["tenant_id"],
            "labels": labels, "annotations": from_json(r["annotations"]), "value": r["value"],
            "active_since": iso(r["active_since"]), "fired_at": iso(r["fired_at"]),
            "resolved_at": iso(r["resolved_at"]), "resolve_reason": r["resolve_reason"],
            "inhibited_by": r["inhibited_by"], "inhibited_by_rule": r["inhibited_by_rule"],
            "inhibited_reason": r["inhibited_reason"], "acknowledged_by": r["acknowledged_by"],
            "acknowledged_at": iso(r["acknowledged_at"]),
            "acknowledged_comment": r["acknowledged_comment"],
            "silenced_by": silenced_by(labels, silences, at),
        })  # fmt: skip
    return out, more


async def read_notifications(
    conn: asyncpg.Connection, tenant: str, f: AlertFilter
) -> tuple[list[dict[str, Any]], bool]:
    """The notifications ``f`` asks for, newest first; and whether more may be left."""
    where = _scoped(f, tenant, "group_labels", "due_at")
    rows, more = await _scan(conn, "alert_notifications", NOTIFICATION_COLUMNS, where,
                             ("due_at", "notification_id"),
                             _matching(f.matchers, "group_labels"), f.limit)  # fmt: skip
    out = []
    for r in rows:
        firing, resolved = (
            from_json(r["firing_fingerprints"]),
            from_json(r["resolved_fingerprints"]),
        )
        out.append({
            "notification_id": r["notification_id"], "receiver": r["receiver"],
            "group_key": r["group_key"], "group_labels": from_json(r["group_labels"]),
            "firing_count": len(firing), "firing": firing,
            "resolved_count": len(resolved), "resolved": resolved, "epoch": r["epoch"],
            "severity": r["severity"], "state": r["state"], "tenant": r["tenant_id"],
            "due_at": iso(r["due_at"]), "sent_at": iso(r["sent_at"]), "attempts": r["attempts"],
            "last_error": r["last_error"], "next_attempt_at": iso(r["next_attempt_at"]),
        })  # fmt: skip
    return out, more


async def read_silences(
    conn: asyncpg.Connection, tenant: str, f: AlertFilter, now: float
) -> tuple[list[dict[str, Any]], bool]:
    """The silences in the state ``f`` asks for at ``now``, newest first; and whether
    more may be left."""
    at = ts(now)
    where = _Where()
    where.add("tenant_id = ANY({}::text[])", [tenant, *SHARED_TENANTS])
    ended = "(ends_at <= {} OR coalesce(expired_at <= {}, false))"
    if f.states == ("expired",):
        where.add(ended, at, at)
    elif f.states is not None:  # active or pending: not ended
        where.add("NOT " + ended, at, at)
    wanted = f.states

    def keep(row: asyncpg.Record) -> bool:
        return wanted is None or silence_state(silence_from_pg(row), at.timestamp()) in wanted

    rows, more = await _scan(conn, "alert_silences", SILENCE_COLUMNS, where,
                             ("created_at", "silence_id"), keep, f.limit)  # fmt: skip
    out = []
    for r in rows:
        out.append({
            "id": r["silence_id"], "matchers": from_json(r["matchers"]),
            "state": silence_state(silence_from_pg(r), at.timestamp()),
            "starts_at": iso(r["starts_at"]), "ends_at": iso(r["ends_at"]),
            "created_by": r["created_by"], "comment": r["comment"],
            "created_at": iso(r["created_at"]), "expired_at": iso(r["expired_at"]),
            "expired_by": r["expired_by"], "expire_reason": r["expire_reason"],
            "tenant": r["tenant_id"],
        })  # fmt: skip
    return out, more
