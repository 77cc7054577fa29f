"""Handlers are pure: given a history of events, assert the events they decide."""

from __future__ import annotations

import msgspec

from events.model import HeartbeatReceived, InputRejected, ServiceDeregistered, ServiceRegistered
from handlers import REACTIONS, RegistryState, fold, react
from handlers.ledger import SeqLedger
from handlers.registry import DEREGISTERED


def registered(seq: int, instance: str = "orders-1", ts: float = 100.0, **kw) -> ServiceRegistered:
    fields = {"service_name": "orders", "host": "10.0.0.5", "port": 8080} | kw
    return ServiceRegistered(
        event_id=f"ingress-{seq}", tenant="default", ts=ts, ingress_seq=seq,
        instance_id=instance, **fields,
    )  # fmt: skip


def heartbeat(seq: int, instance: str = "orders-1", ts: float = 110.0, **kw) -> HeartbeatReceived:
    return HeartbeatReceived(
        event_id=f"ingress-{seq}", tenant="default", ts=ts, ingress_seq=seq,
        service_name="orders", instance_id=instance, **kw,
    )  # fmt: skip


def deregistered(seq: int, instance: str = "orders-1", ts: float = 120.0) -> ServiceDeregistered:
    return ServiceDeregistered(
        event_id=f"ingress-{seq}", tenant="default", ts=ts, ingress_seq=seq,
        service_name="orders", instance_id=instance,
    )  # fmt: skip


def test_registration_is_recorded_with_its_lease_resolved():
    """A registration is always recorded, its lease resolved from the policy (ttl 3 x
    interval, the policy's expiry) unless it names its own."""
    e = registered(1)
    _, out = react(RegistryState(), e, now=0.0)
    assert out == [msgspec.structs.replace(e, ttl_s=30.0, expire_after_s=60.0)]
    own = registered(2, ttl_s=12.0, expire_after_s=5.0)
    _, out = react(RegistryState(), own, now=0.0)
    assert out == [own]


def test_heartbeat_of_registered_instance_is_recorded():
    """A heartbeat of a live instance is recorded with its running last_seen and
    updates last_seen and load; the same health as recorded records nothing else."""
    state = fold([registered(1)])
    hb = heartbeat(2, status="healthy", load=0.5)
    state, out = react(state, hb, now=0.0)
    assert out == [msgspec.structs.replace(hb, last_seen=110.0)]
    inst = state.instances[("default", "orders", "orders-1")]
    assert (inst.status, inst.last_seen, inst.load) == ("healthy", 110.0, 0.5)


def test_heartbeat_of_unknown_instance_is_rejected():
    """A heartbeat nobody registered becomes InputRejected(UNKNOWN_INSTANCE), same id and seq."""
    _, out = react(RegistryState(), heartbeat(7), now=0.0)
    assert len(out) == 1
    rej = out[0]
    assert isinstance(rej, InputRejected)
    assert (rej.reason_code, rej.event_id, rej.ingress_seq) == ("UNKNOWN_INSTANCE", "ingress-7", 7)
    assert "orders/orders-1" in rej.reason


def test_heartbeat_after_deregistration_is_rejected():
    """After deregistration the instance is not live: its heartbeats are rejected."""
    state = fold([registered(1), deregistered(2)])
    _, out = react(state, heartbeat(3), now=0.0)
    assert isinstance(out[0], InputRejected)
    assert out[0].reason_code == "UNKNOWN_INSTANCE"


def test_deregistration_of_unknown_instance_is_rejected():
    """Deregistering an instance that is not live is rejected, not silently ignored."""
    _, out = react(RegistryState(), deregistered(1), now=0.0)
    assert isinstance(out[0], InputRejected)


def test_deregistration_keeps_history():
    """A deregistered instance stays in the state with status 'deregistered'."""
    state = fold([registered(1), deregistered(2)])
    assert state.instances[("default", "orders", "orders-1")].status == DEREGISTERED
    assert state.live(("default", "orders", "orders-1")) is None


def test_reregistration_is_idempotent_and_keeps_registered_at():
    """Registering a live instance again updates its fields but keeps registered_at."""
    state = fold([registered(1, ts=100.0), registered(2, ts=200.0, version="2.0")])
    inst = state.instances[("default", "orders", "orders-1")]
    assert (inst.registered_at, inst.last_seen, inst.version) == (100.0, 200.0, "2.0")
    assert len(state.instances) == 1


def test_registration_after_deregistration_starts_a_new_life():
    """Registering a deregistered instance resets registered_at and makes it live again."""
    state = fold([registered(1, ts=100.0), deregistered(2), registered(3, ts=300.0)])
    inst = state.instances[("default", "orders", "orders-1")]
    assert (inst.status, inst.registered_at) == ("healthy", 300.0)


def test_fold_tracks_the_ingress_watermark_and_rejections():
    """The fold records the highest ingress sequence and counts rejections per tenant."""
    rej = InputRejected(
        event_id="ingress-9", tenant="acme", ts=1.0, ingress_seq=9,
        subject="hub.register.acme", reason_code="MALFORMED_JSON", reason="x",
    )  # fmt: skip
    state = fold([registered(1), rej, heartbeat(4)])
    assert state.ingress.high == 9
    assert [state.ingress.seen(n) for n in (1, 2, 4, 9)] == [True, False, True, True]
    assert state.rejected == {"acme": 1}


def test_old_heartbeat_does_not_move_last_seen_back():
    """last_seen never goes backwards, whatever order the timestamps arrive in."""
    state = fold([registered(1, ts=100.0), heartbeat(2, ts=150.0), heartbeat(3, ts=120.0)])
    assert state.instances[("default", "orders", "orders-1")].last_seen == 150.0


def test_every_event_type_has_a_reaction():
    """The one registry of reactions covers every event type the log can hold."""
    from events.model import EVENT_TYPES

    assert set(REACTIONS) == set(EVENT_TYPES)


def test_ledger_knows_out_of_order_sequences_exactly():
    """A re-delivered message below the highest recorded sequence is recorded only if
    it really was: the ledger is exact, not a high-water mark."""
    ledger = SeqLedger()
    for seq in (1, 2, 3, 7, 8):
        ledger.add(seq)
    assert (ledger.floor, ledger.above, ledger.high) == (3, {7, 8}, 8)
    assert not ledger.seen(5)
    for seq in (4, 5, 6):
        ledger.add(seq)
    assert (ledger.floor, ledger.above) == (8, set())


def test_ledger_floor_rises_past_sequences_gone_from_the_stream():
    """Sequences below the stream's first available one are never re-delivered."""
    ledger = SeqLedger()
    ledger.add(1)
    ledger.add(5)
    ledger.raise_floor(5)
    assert (ledger.floor, ledger.above) == (5, set())


def test_a_change_answering_a_later_recorded_critical_is_not_dated_before_it():
    """A heartbeat stored before the timer recorded its instance critical (it waited in
    ingress) records the recovery at the critical's time, not before it: the instance's
    health history stays in time order."""
    from events.model import InstanceHealthChanged

    critical = InstanceHealthChanged(
        event_id="hub-lapsed", tenant="default", ts=140.0, service_name="orders",
        instance_id="orders-1", previous="healthy", status="critical", reason="silent",
    )  # fmt: skip
    state = fold([registered(1), critical])
    _, out = react(state, heartbeat(2, ts=139.5), now=141.0)
    change = out[1]
    assert isinstance(change, InstanceHealthChanged)
    assert (change.previous, change.status, change.ts) == ("critical", "healthy", 140.0)
    _, out = react(fold([registered(1), critical]), heartbeat(3, ts=150.0), now=151.0)
    assert out[1].ts == 150.0  # a later heartbeat keeps its own time
