"""The application core (pure): candidates and the clock in; what to record out.

Everything the hub decides goes through ``step``: ingress messages as they arrived
(``Arrival``), results from inside the hub such as infrastructure checks
(``Internal``), the lease timer's turn (``TimerTurn``), and an outage of the event log
told once it is over (``Outage``). For each candidate the
decision is dispatched through ``REACTIONS``, and what it decides is folded into the
state at once (``evolve``), so the next candidate is decided on the state that includes
it. ``step`` returns the ``Outcome``: the events to record in order, the dead letters
(rejected input with its original bytes), the events to announce to watchers, counters,
and notices worth a log line. It does no I/O and reads no clock: the adapter
(``hub.ingest``) records the outcome, then acknowledges the input.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from events.model import (
    ANNOUNCED,
    EVENT_TYPES,
    WATCH_KIND,
    Event,
    HeartbeatReceived,
    InfraChecked,
    InputRejected,
    ServiceDeregistered,
    ServiceRegistered,
)
from events.translate import (
    IngressRules,
    classify_checked,
    failed_on,
    printable,
    quarantined,
)
from handlers.alerting import alert_pass, decide_outage
from handlers.alerting import next_due as alerts_next_due
from handlers.liveness import next_due as leases_next_due
from handlers.liveness import tick
from handlers.registry import (
    RegistryState,
    decide_deregistration,
    decide_heartbeat,
    decide_infra_check,
    decide_registration,
    evolve,
)

Decision = Callable[[RegistryState, Any, float], list[Event]]


def taken(state: RegistryState, event: Event, now: float) -> list[Event]:
    """A decision already taken (by the hub's timer, or the monitor's configuration
    load): recorded as is."""
    del state, now
    return [event]


# The decisions taken on candidates; every other event type is a decision already taken
# (by the timer, the monitor, or one of these) and is recorded as is.
_DECISIONS: dict[type[Event], Decision] = {
    ServiceRegistered: decide_registration,
    HeartbeatReceived: decide_heartbeat,
    ServiceDeregistered: decide_deregistration,
    InfraChecked: decide_infra_check,
}
# The one registry of reactions, for every event type of the union (events.model).
REACTIONS: dict[type[Event], Decision] = {t: _DECISIONS.get(t, taken) for t in EVENT_TYPES}


def decide(state: RegistryState, event: Event, now: float) -> list[Event]:
    """What to record for one candidate event (the state is not changed)."""
    return REACTIONS.get(type(event), taken)(state, event, now)


def react(state: RegistryState, event: Event, now: float) -> tuple[RegistryState, list[Event]]:
    """Decide, then fold what was decided: ``(state, event, now) -> (state, events)``."""
    decided = decide(state, event, now)
    for e in decided:
        evolve(state, e)
    return state, decided


def next_due(state: RegistryState, *, lease_floor: float, judge_leases: bool) -> float:
    """When the timer next has something to decide: a lease, or an alert's deadline."""
    return min(leases_next_due(state, lease_floor=lease_floor, judge_leases=judge_leases),
               alerts_next_due(state))  # fmt: skip


# --- candidates -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """One ingress message as delivered: its stream sequence and stored time, subject and
    bytes, and how many times the hub has already failed on it alone (a bug)."""

    seq: int
    ts: float
    subject: str
    payload: bytes
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Internal:
    """A result from inside the hub (an infrastructure check, a configuration load)."""

    event: Event


@dataclass(frozen=True, slots=True)
class TimerTurn:
    """The lease timer's turn (``handlers.liveness.tick``).

    Attributes:
        lease_floor: leases run from this time at the earliest (the hub's start).
        judge_leases: False while the hub lags behind its ingress.
    """

    lease_floor: float
    judge_leases: bool


@dataclass(frozen=True, slots=True)
class Outage:
    """The event log could not be written from ``since`` to ``until`` (None: it still
    cannot, as far as the hub knew when it said so out of band); ``reached``: the
    notifications said out of band meanwhile, by id, with the integrations that took
    them (``handlers.alerting.decide_outage``)."""

    log: str
    since: float
    until: float | None
    reached: dict[str, list[str]] = field(default_factory=dict)


Candidate = Arrival | Internal | TimerTurn | Outage


# --- outcome --------------------------------------------------------------------------

# Counter names by event type (an f-string per message adds up).
_COUNTERS = {t: f"ingress_{t.__name__}" for t in WATCH_KIND}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Rejected input to dead-letter: the rejection and the original bytes."""

    event: InputRejected
    payload: bytes


@dataclass(frozen=True, slots=True)
class Notice:
    """A log line the adapter writes: ``level`` is a structlog method name."""

    level: str
    name: str
    fields: dict[str, Any]
    error: Exception | None = None


@dataclass
class Outcome:
    """What one ``step`` decided, in order."""

    record: list[Event] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    announce: list[Event] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    notices: list[Notice] = field(default_factory=list)

    def extend(self, other: Outcome) -> None:
        self.record += other.record
        self.dead += other.dead
        self.announce += other.announce
        self.counts.update(other.counts)
        self.notices += other.notices


def step(
    state: RegistryState, now: float, candidates: Iterable[Candidate], rules: IngressRules
) -> Outcome:
    """Decide every candidate in order on ``state`` (folding each decision) at ``now``."""
    out = Outcome()
    for c in candidates:
        match c:
            case Arrival():
                _arrival(state, now, c, rules, out)
            case Internal():
                _internal(state, now, c.event, out)
            case TimerTurn():
                _timer(state, now, c, out)
            case Outage():
                out.record += decide_outage(state, now, c.log, c.since, c.until, c.reached)
    # The alerts look at what this turn recorded, and at what is due (handlers.alerting).
    try:
        alerted = alert_pass(state, now, out.record)
    except Exception as exc:  # a bug: the alerts miss this turn, the registry goes on
        out.notices.append(Notice("error", "alert_decision_failed", {"error": repr(exc)}, exc))
        out.counts["alert_decisions_failed"] += 1
        alerted = []
    for e in alerted:
        out.counts[f"alert_{type(e).__name__}"] += 1
    out.record += alerted
    # Pushed to watchers: everything but heartbeats and check results (the bulk; a
    # change they cause is announced as such). See events.model.ANNOUNCED.
    out.announce = [e for e in out.record if type(e) in ANNOUNCED]
    return out


def _arrival(
    state: RegistryState, now: float, a: Arrival, rules: IngressRules, out: Outcome
) -> None:
    counts = out.counts
    if state.ingress.seen(a.seq):  # recorded before a crash, delivered again
        counts["ingress_redelivered_skipped"] += 1
        return
    if a.failed >= rules.max_deliver:
        out.notices.append(Notice("error", "ingress_message_quarantined",
                                  {"seq": a.seq, "failed": a.failed,
                                   "subject": printable(a.subject)}))  # fmt: skip
        candidate: Event = quarantined(rules, a.subject, a.payload, seq=a.seq, ts=a.ts,
                                       failed=a.failed)  # fmt: skip
    else:
        candidate, error = classify_checked(rules, a.subject, a.payload, seq=a.seq, ts=a.ts)
        if error is not None:
            out.notices.append(Notice("error", "ingress_message_failed",
                                      {"seq": a.seq, "subject": printable(a.subject),
                                       "error": repr(error)}, error))  # fmt: skip
    try:
        events = decide(state, candidate, now)
    except Exception as exc:  # a bug: this message is rejected, the batch goes on
        out.notices.append(Notice("error", "ingress_decision_failed",
                                  {"seq": a.seq, "error": repr(exc)}, exc))  # fmt: skip
        events = [failed_on(tenant=candidate.tenant, seq=a.seq, ts=candidate.ts,
                            subject=a.subject, payload=a.payload, error=exc)]  # fmt: skip
    for e in events:
        evolve(state, e)
        if type(e) is InputRejected:
            out.dead.append(DeadLetter(e, a.payload))
            counts["ingress_rejected"] += 1
            counts[f"ingress_rejected:{e.reason_code}"] += 1
        else:
            counts[_COUNTERS.get(type(e)) or f"ingress_{type(e).__name__}"] += 1
    out.record += events


def _internal(state: RegistryState, now: float, candidate: Event, out: Outcome) -> None:
    try:
        events = decide(state, candidate, now)
    except Exception as exc:  # a bug: this result is lost, the next one comes
        out.notices.append(Notice("error", "internal_decision_failed",
                                  {"candidate": type(candidate).__name__,
                                   "error": repr(exc)}, exc))  # fmt: skip
        out.counts["internal_decisions_failed"] += 1
        return
    for e in events:
        evolve(state, e)
    out.record += events


def _timer(state: RegistryState, now: float, turn: TimerTurn, out: Outcome) -> None:
    if not turn.judge_leases:
        out.counts["lease_decisions_deferred_lagging"] += 1
    due = tick(state, now, lease_floor=turn.lease_floor, judge_leases=turn.judge_leases)
    for decision in due:
        for e in decide(state, decision, now):
            evolve(state, e)
            out.counts[f"timer_{type(e).__name__}"] += 1
            out.record.append(e)
