"""The application core, ``handlers.core.step``: candidates and the clock in, what to
record, dead-letter and announce out, without a server. What it records, appended to
the in-memory event log and folded back, is the state it decided on."""

from __future__ import annotations

import asyncio
import dataclasses

import msgspec
import pytest

from events.model import (
    HeartbeatReceived,
    InfraChecked,
    InfraConfigLoaded,
    InfraStatusChanged,
    InputRejected,
    InstanceHealthChanged,
    ServiceRegistered,
)
from handlers import REACTIONS, LivenessPolicy, RegistryState, fold
from handlers.core import Arrival, Internal, TimerTurn, step
from hub.config import HubConfig
from hub.eventlog.memory import MemoryEventLog

RULES = HubConfig(tenants=frozenset({"default", "acme"}), max_deliver=3)
REGISTER = b'{"service_name":"orders","instance_id":"o-1","host":"10.0.0.5","port":8080,' \
    b'"heartbeat_interval_s":1}'  # fmt: skip
BEAT = b'{"service_name":"orders","instance_id":"o-1","status":"healthy"}'
DEGRADED = b'{"service_name":"orders","instance_id":"o-1","status":"degraded"}'


CONFIG = InfraConfigLoaded(event_id="cfg-1", tenant="_infra", ts=99.0, source="infra.yaml",
                           digest="d1", components=[{"name": "db", "port": 5432}])  # fmt: skip


def check(ts: float, status: str = "UNHEALTHY") -> InfraChecked:
    return InfraChecked(event_id=f"check@{ts}", tenant="_infra", ts=ts, component="db",
                        status=status, response_time_ms=5.0)  # fmt: skip


def arrivals(*messages: tuple[str, bytes], first: int = 1, ts: float = 100.0) -> list[Arrival]:
    return [Arrival(first + i, ts + i, s, p) for i, (s, p) in enumerate(messages)]


def kinds(events: list) -> list[str]:
    return [type(e).__name__ for e in events]


def test_an_ingress_batch_is_recorded_with_its_dead_letters_and_announcements():
    state = RegistryState()
    out = step(state, 110.0, arrivals(
        ("hub.register", REGISTER),
        ("hub.heartbeat", BEAT),
        ("hub.heartbeat", b"{not json"),
        ("hub.heartbeat", DEGRADED),
        ("hub.nobody.heartbeat", BEAT),
    ), RULES)  # fmt: skip
    assert kinds(out.record) == [
        "ServiceRegistered", "HeartbeatReceived", "InputRejected", "HeartbeatReceived",
        "InstanceHealthChanged", "InputRejected",
    ]  # fmt: skip
    # Every message is one recorded event with its id from the ingress sequence.
    assert [e.event_id for e in out.record] == [
        "ingress-1", "ingress-2", "ingress-3", "ingress-4", "ingress-4.health", "ingress-5",
    ]  # fmt: skip
    assert [(d.event.reason_code, d.payload) for d in out.dead] == [
        ("MALFORMED_JSON", b"{not json"), ("UNKNOWN_TENANT", BEAT),
    ]  # fmt: skip
    # Watchers hear of changes, not of every heartbeat.
    assert kinds(out.announce) == ["ServiceRegistered", "InputRejected", "InstanceHealthChanged",
                                   "InputRejected"]  # fmt: skip
    assert out.counts["ingress_rejected"] == 2
    assert out.counts["ingress_rejected:MALFORMED_JSON"] == 1
    assert out.counts["ingress_HeartbeatReceived"] == 2
    # Decided on the state that includes each decision: the state is the fold of them.
    assert state.instances[("default", "orders", "o-1")].status == "degraded"
    assert state.ingress.floor == 5


def test_a_message_delivered_again_is_not_decided_again():
    state = RegistryState()
    step(state, 110.0, arrivals(("hub.register", REGISTER), ("hub.heartbeat", BEAT)), RULES)
    again = step(state, 111.0, arrivals(("hub.heartbeat", BEAT), first=2), RULES)
    assert again.record == [] and again.counts["ingress_redelivered_skipped"] == 1


def test_a_message_the_hub_keeps_failing_on_is_quarantined():
    out = step(RegistryState(), 110.0, [Arrival(9, 100.0, "hub.register", REGISTER, failed=3)],
               RULES)  # fmt: skip
    (rejected,) = out.record
    assert isinstance(rejected, InputRejected) and rejected.reason_code == "INTERNAL_ERROR"
    assert "3 times" in rejected.reason and out.dead[0].payload == REGISTER
    assert [n.name for n in out.notices] == ["ingress_message_quarantined"]


def test_a_bug_in_a_decision_rejects_that_message_only(monkeypatch: pytest.MonkeyPatch):
    def broken(state, event, now):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(REACTIONS, HeartbeatReceived, broken)
    state = RegistryState()
    out = step(state, 110.0, arrivals(("hub.register", REGISTER), ("hub.heartbeat", BEAT),
                                      ("hub.deregister", BEAT)), RULES)  # fmt: skip
    assert kinds(out.record) == ["ServiceRegistered", "InputRejected", "ServiceDeregistered"]
    assert out.record[1].reason_code == "INTERNAL_ERROR"
    assert out.dead[0].payload == BEAT
    (notice,) = out.notices
    assert notice.name == "ingress_decision_failed" and isinstance(notice.error, ZeroDivisionError)


def test_internal_results_and_timer_turns_take_the_same_path():
    state = RegistryState(policy=LivenessPolicy(infra_failures_to_trip=1))
    step(state, 100.0, arrivals(("hub.register", REGISTER)), RULES)
    out = step(state, 101.0, [Internal(CONFIG), Internal(check(101.0))], RULES)
    assert kinds(out.record) == ["InfraConfigLoaded", "InfraChecked", "InfraStatusChanged"]
    assert kinds(out.announce) == ["InfraConfigLoaded", "InfraStatusChanged"]
    # The lease (3 x 1 s) ends at 103: a turn at 103.5 records the critical, announced.
    out = step(state, 103.5, [TimerTurn(lease_floor=0.0, judge_leases=True)], RULES)
    assert kinds(out.record) == kinds(out.announce) == ["InstanceHealthChanged"]
    assert out.record[0].status == "critical" and out.counts["timer_InstanceHealthChanged"] == 1
    # Lagging: no lease decision, and it is counted.
    out = step(RegistryState(), 200.0, [TimerTurn(lease_floor=0.0, judge_leases=False)], RULES)
    assert out.record == [] and out.counts["lease_decisions_deferred_lagging"] == 1


def test_what_the_core_records_folds_back_to_the_state_it_decided_on():
    """Record every outcome in the in-memory log, read it back, fold it: the same
    registry (replay never re-decides)."""

    async def scenario() -> None:
        log = MemoryEventLog(partitions=3)
        await log.start()
        state = RegistryState(policy=LivenessPolicy(infra_failures_to_trip=1))
        batches = [
            (100.0, arrivals(("hub.register", REGISTER), ("hub.heartbeat", DEGRADED),
                             ("hub.acme.register", REGISTER), ("hub.heartbeat", b"\xff"))),
            (101.0, [Internal(CONFIG), Internal(check(101.0))]),
            (110.0, [TimerTurn(lease_floor=0.0, judge_leases=True)]),
            (111.0, arrivals(("hub.heartbeat", BEAT), first=5, ts=111.0)),
        ]  # fmt: skip
        for now, candidates in batches:
            out = step(state, now, candidates, RULES)
            await log.append(out.record)
        events = [r.event async for batch in log.read(follow=False) for r in batch]
        replayed = fold(sorted(events, key=_log_order))
        # (Less the flap detector's short-term memory, which the log's roll-up of
        # heartbeats may shorten: see handlers.registry.Instance.)
        assert _views(replayed) == _views(state)
        assert replayed.infra == state.infra and replayed.rejected == state.rejected
        assert {type(e) for e in events} >= {ServiceRegistered, InstanceHealthChanged,
                                             InfraStatusChanged, InputRejected}  # fmt: skip

    asyncio.run(scenario())


def _views(state: RegistryState) -> dict:
    memory = {"reported_changed_at", "changes"}
    return {
        key: {k: v for k, v in dataclasses.asdict(inst).items() if k not in memory}
        for key, inst in state.instances.items()
    }


def _log_order(e) -> tuple[float, str]:
    # The log keeps order per instance (partition); across partitions the fold needs
    # only each instance's own order, which time then id gives back here.
    return (e.ts, e.event_id)


def test_msgspec_structs_are_not_changed_by_deciding():
    """Decisions build new events; the candidate stays what it was."""
    state = RegistryState()
    candidate = ServiceRegistered(event_id="ingress-1", tenant="default", ts=1.0, ingress_seq=1,
                                  service_name="orders", instance_id="o-1", host="h", port=1,
                                  heartbeat_interval_s=2.0)  # fmt: skip
    before = msgspec.json.encode(candidate)
    step(state, 1.0, [Internal(candidate)], RULES)
    assert msgspec.json.encode(candidate) == before
