"""Leases, health changes, flapping and self-preservation as pure decisions; and the
property that makes a bounded log possible: the log with superseded heartbeats removed
folds to the same views as the whole log."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from events.model import (
    Event,
    FlappingEnded,
    FlappingStarted,
    HeartbeatReceived,
    InstanceExpired,
    InstanceHealthChanged,
    SelfPreservationStarted,
    ServiceRegistered,
    compaction_key,
)
from handlers import LivenessPolicy, RegistryState, evolve, react, tick
from projections.fold import fold_view
from projections.postgres_render import expected_pg
from projections.redis_render import canonical_redis, expected_redis

POLICY = LivenessPolicy(expire_after_s=30.0, flap_window_s=60.0, flap_threshold=4,
                        flap_quiet_s=20.0, preservation_share=0.5, preservation_min=3,
                        preservation_max_s=100.0)  # fmt: skip


class Hub:
    """A tiny driver: ingress events through ``react``, time through ``tick``; keeps the
    recorded log like the hub does."""

    def __init__(self, policy: LivenessPolicy = POLICY) -> None:
        self.state = RegistryState(policy=policy)
        self.log: list[Event] = []
        self.seq = 0

    def ingress(self, event: Event) -> list[Event]:
        self.seq += 1
        e = msgspec.structs.replace(event, event_id=f"ingress-{self.seq}", ingress_seq=self.seq)
        _, out = react(self.state, e, now=e.ts)
        self.log += out
        return out

    def register(self, instance: str, ts: float, interval: float = 10.0) -> list[Event]:
        return self.ingress(ServiceRegistered(
            event_id="", tenant="default", ts=ts, service_name="orders", instance_id=instance,
            host="10.0.0.1", port=80, heartbeat_interval_s=interval,
        ))  # fmt: skip

    def beat(self, instance: str, ts: float, status: str = "healthy", **kw) -> list[Event]:
        return self.ingress(HeartbeatReceived(
            event_id="", tenant="default", ts=ts, service_name="orders", instance_id=instance,
            status=status, **kw,
        ))  # fmt: skip

    def at(self, now: float) -> list[Event]:
        out = tick(self.state, now)
        for e in out:
            evolve(self.state, e)
        self.log += out
        return out

    def status(self, instance: str) -> str:
        return self.state.instances[("default", "orders", instance)].status


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


def test_a_reported_change_is_recorded_with_its_reason_and_no_change_records_nothing():
    hub = Hub()
    hub.register("a", 0.0)
    assert kinds(hub.beat("a", 5.0)) == ["HeartbeatReceived"]
    out = hub.beat("a", 6.0, status="degraded", checks={"db": {"status": "fail"}})
    assert kinds(out) == ["HeartbeatReceived", "InstanceHealthChanged"]
    change = out[1]
    assert isinstance(change, InstanceHealthChanged)
    assert (change.previous, change.status) == ("healthy", "degraded")
    assert "failing checks: db" in change.reason
    assert change.event_id == "ingress-3.health"
    assert hub.status("a") == "degraded"


def test_missing_the_ttl_makes_an_instance_critical_then_expired():
    """ttl = 3 x interval by default; critical for expire_after -> expired."""
    hub = Hub()
    hub.register("a", 0.0, interval=10.0)
    hub.beat("a", 10.0)
    assert hub.at(40.0) == []  # exactly at last_seen + ttl: not yet
    out = hub.at(40.1)
    assert kinds(out) == ["InstanceHealthChanged"]
    assert (out[0].status, hub.status("a")) == ("critical", "critical")
    assert "no heartbeat for 30.1 s" in out[0].reason
    assert hub.at(70.0) == []  # critical for 29.9 s
    out = hub.at(70.2)
    assert kinds(out) == ["InstanceExpired"]
    assert hub.status("a") == "expired" and not hub.state.instances[("default", "orders", "a")].live
    # An expired instance's heartbeat is refused: it must register again.
    assert kinds(hub.beat("a", 71.0)) == ["InputRejected"]


def test_a_heartbeat_brings_a_critical_instance_back():
    hub = Hub()
    hub.register("a", 0.0)
    hub.at(31.0)
    out = hub.beat("a", 32.0)
    assert kinds(out) == ["HeartbeatReceived", "InstanceHealthChanged"]
    assert (out[1].previous, out[1].status) == ("critical", "healthy")
    assert "heartbeat resumed" in out[1].reason


def test_no_lease_decision_while_the_hub_lags_or_before_a_full_ttl_since_its_start():
    hub = Hub()
    hub.register("a", 0.0)
    assert tick(hub.state, 100.0, judge_leases=False) == []
    assert tick(hub.state, 100.0, lease_floor=80.0) == []  # hub started at 80: ttl from then
    assert kinds(tick(hub.state, 110.1, lease_floor=80.0)) == ["InstanceHealthChanged"]


def test_flapping_is_one_event_not_a_flood_and_ends_when_stable():
    hub = Hub()
    hub.register("a", 0.0)
    changes = []
    for i in range(20):
        out = hub.beat("a", 1.0 + i, status="unhealthy" if i % 2 == 0 else "healthy")
        changes += out[1:]
    # threshold 4: three changes, then flapping, then silence.
    assert kinds(changes) == ["InstanceHealthChanged"] * 3 + ["FlappingStarted"]
    assert hub.state.instances[("default", "orders", "a")].flapping
    assert hub.at(25.0) == []  # last change at 20.0, quiet for 5 s < 20 s
    for t in range(21, 40):
        assert hub.beat("a", float(t))[1:] == []  # stable and healthy
    out = hub.at(40.5)
    assert kinds(out) == ["FlappingEnded"]
    ended = out[0]
    assert isinstance(ended, FlappingEnded) and ended.status == "healthy"
    assert not hub.state.instances[("default", "orders", "a")].flapping


def test_a_flapping_instance_that_dies_ends_flapping_as_critical_and_expires():
    hub = Hub()
    hub.register("a", 0.0)
    for i in range(6):
        hub.beat("a", 1.0 + i, status="unhealthy" if i % 2 == 0 else "healthy")
    out = hub.at(40.0)  # silent since 6.0: quiet, and past its ttl
    assert kinds(out) == ["FlappingEnded"] and out[0].status == "critical"
    assert kinds(hub.at(70.5)) == ["InstanceExpired"]


def fleet(n: int) -> Hub:
    hub = Hub()
    for i in range(n):
        hub.register(f"i{i}", 0.0)
    return hub


def test_most_instances_stopping_at_once_starts_self_preservation_which_ends_at_its_bound():
    hub = fleet(10)
    for t in range(10, 200, 10):  # two keep beating
        hub.beat("i0", float(t))
        hub.beat("i1", float(t))
        out = hub.at(t + 0.5)
        if t == 30:
            assert kinds(out) == ["InstanceHealthChanged"] * 8  # the lapse is honest
        if t == 60:  # critical since 30.5, due at 60.5: mass -> preserve, nothing expires
            started = out
            assert kinds(out) == ["SelfPreservationStarted"]
            assert (out[0].critical, out[0].live, out[0].until) == (8, 10, 160.5)
            assert len(out[0].at_risk) == 8
        if 60 < t < 160:
            assert out == []  # no expiry while preserving
        if t == 160:
            assert kinds(out) == ["SelfPreservationEnded"] and out[0].reason == "bound_reached"
        if t == 170:  # cooldown: the due instances now expire, no new preservation
            assert kinds(out) == ["InstanceExpired"] * 8
    assert isinstance(started[0], SelfPreservationStarted)
    assert [hub.status(f"i{i}") for i in range(10)] == ["healthy"] * 2 + ["expired"] * 8


def test_self_preservation_ends_early_when_the_instances_come_back():
    hub = fleet(5)
    hub.at(31.0)
    assert kinds(hub.at(61.5)) == ["SelfPreservationStarted"]
    for i in range(5):
        hub.beat(f"i{i}", 62.0)
    out = hub.at(62.5)
    assert kinds(out) == ["SelfPreservationEnded"] and out[0].reason == "recovered"
    assert hub.state.preservation == {}


def test_a_few_instances_dying_expire_normally():
    hub = fleet(10)
    for t in range(10, 100, 10):
        for i in range(8):
            hub.beat(f"i{i}", float(t))
        out = hub.at(t + 0.5)
        assert not any(isinstance(e, SelfPreservationStarted) for e in out)
    assert hub.status("i8") == hub.status("i9") == "expired"


# --- bounded log: dropping superseded heartbeats changes no view -----------------------

INSTANCES = st.sampled_from(["a", "b", "c"])
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("register"), INSTANCES, st.floats(0.1, 5)),
        st.tuples(st.just("beat"), INSTANCES, st.sampled_from(["degraded", "unhealthy"])),
        st.tuples(st.just("beat"), INSTANCES, st.just("healthy")),
        st.tuples(st.just("deregister"), INSTANCES, st.just(0)),
        st.tuples(st.just("wait"), st.just(""), st.floats(0.1, 40)),
    ),
    max_size=60,
)  # fmt: skip


def compacted(log: list[Event]) -> list[Event]:
    """The log as compaction leaves it: of each compaction key, the latest record only."""
    last = {compaction_key(e): i for i, e in enumerate(log) if compaction_key(e)}
    return [
        e for i, e in enumerate(log) if compaction_key(e) is None or last[compaction_key(e)] == i
    ]


def rendered(log: list[Event]) -> tuple[dict[str, str], dict[str, str]]:
    view = fold_view(log)
    return expected_pg(view), {k: canonical_redis(k, v) for k, v in expected_redis(view).items()}


@settings(max_examples=300, deadline=None)
@given(STEPS, st.integers(0, 3))
def test_the_log_without_superseded_heartbeats_folds_to_the_same_views(steps, late):
    """Random registrations, heartbeats (with health changes, hence flapping), deregs and
    time passing (lapses, expiries, self-preservation), some heartbeats re-delivered late
    with an older timestamp: the compacted log renders exactly the same views."""
    from events.model import ServiceDeregistered

    policy = LivenessPolicy(expire_after_s=10, flap_window_s=30, flap_threshold=3,
                            flap_quiet_s=5, preservation_min=2, preservation_max_s=20)  # fmt: skip
    hub = Hub(policy)
    now = 1000.0
    for kind, instance, arg in steps:
        now += 0.5
        if kind == "register":
            hub.register(instance, now, interval=arg)
        elif kind == "beat":
            hub.beat(instance, now, status=arg, load=now % 7)
            if late and hub.seq % (late + 3) == 0:  # an older one, re-delivered after
                hub.beat(instance, now - 0.4, status="healthy", load=1.0)
        elif kind == "deregister":
            hub.ingress(
                ServiceDeregistered(
                    event_id="",
                    tenant="default",
                    ts=now,
                    service_name="orders",
                    instance_id=instance,
                )
            )
        else:
            now += arg
            hub.at(now)
    assert rendered(compacted(hub.log)) == rendered(hub.log)


def test_compaction_keeps_every_event_but_superseded_heartbeats():
    hub = Hub()
    hub.register("a", 0.0)
    for t in range(1, 6):
        hub.beat("a", float(t), load=float(t))
    hub.at(100.0)
    kept = compacted(hub.log)
    assert kinds(kept) == ["ServiceRegistered", "HeartbeatReceived", "InstanceHealthChanged"]
    assert kept[1].load == 5.0 and kept[1].last_seen == 5.0
    assert isinstance(hub.log[-1], InstanceHealthChanged | InstanceExpired | FlappingStarted)
