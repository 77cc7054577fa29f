"""The deadline timer takes exactly the decisions of the scan it replaced (every live
instance looked at on every tick), on random histories; and it says when it is next due,
so the hub wakes for a deadline instead of waiting for the next tick."""

from __future__ import annotations

import math

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from events.model import Event, HeartbeatReceived, ServiceDeregistered, ServiceRegistered
from handlers import LivenessPolicy, RegistryState, evolve, react, tick
from handlers.liveness import next_due
from tests.unit.lease_scan import scan

POLICY = LivenessPolicy(expire_after_s=10, flap_window_s=30, flap_threshold=3, flap_quiet_s=5,
                        preservation_min=2, preservation_share=0.5,
                        preservation_max_s=20)  # fmt: skip

TENANTS = st.sampled_from(["t1", "t2"])
INSTANCES = st.sampled_from(["a", "b", "c", "d"])
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("register"), TENANTS, INSTANCES, st.floats(0.1, 5)),
        st.tuples(st.just("beat"), TENANTS, INSTANCES,
                  st.sampled_from(["healthy", "healthy", "degraded", "unhealthy"])),
        st.tuples(st.just("late"), TENANTS, INSTANCES, st.floats(0.0, 3)),
        st.tuples(st.just("late"), TENANTS, INSTANCES, st.floats(-3.0, -0.01)),
        st.tuples(st.just("deregister"), TENANTS, INSTANCES, st.just(0)),
        st.tuples(st.just("wait"), st.booleans(), st.integers(0, 2), st.floats(0.0, 25)),
    ),
    max_size=80,
)  # fmt: skip


class Driver:
    def __init__(self) -> None:
        self.state = RegistryState(policy=POLICY)
        self.seq = 0

    def ingress(self, event: Event) -> None:
        self.seq += 1
        e = msgspec.structs.replace(event, event_id=f"ingress-{self.seq}", ingress_seq=self.seq)
        react(self.state, e, now=e.ts)


@settings(max_examples=400, deadline=None)
@given(STEPS)
def test_the_deadline_timer_decides_what_the_scan_decided(steps):
    """Registrations (short and long leases), heartbeats with health changes (flapping),
    late heartbeats, deregistrations, time passing with and without judging leases and
    with the lease floor raised: at every turn the timer's decisions equal the scan's,
    in the same order; and between turns the scan has nothing to decide before the time
    the timer says it is next due."""
    d = Driver()
    now, floor = 1000.0, 0.0
    for step in steps:
        now += 0.25
        match step:
            case ("register", tenant, instance, interval):
                d.ingress(ServiceRegistered(
                    event_id="", tenant=tenant, ts=now, service_name="svc",
                    instance_id=instance, host="10.0.0.1", port=80,
                    heartbeat_interval_s=interval,
                ))  # fmt: skip
            case ("beat" | "late", tenant, instance, arg):
                # (a late one: healthy if ``arg`` >= 0, else degraded, from |arg| s ago)
                status, ts = (
                    (arg, now) if step[0] == "beat"
                    else ("healthy" if arg >= 0 else "degraded", now - abs(arg))
                )  # fmt: skip
                d.ingress(HeartbeatReceived(
                    event_id="", tenant=tenant, ts=ts, service_name="svc",
                    instance_id=instance, status=status,
                ))  # fmt: skip
            case ("deregister", tenant, instance, _):
                d.ingress(ServiceDeregistered(
                    event_id="", tenant=tenant, ts=now, service_name="svc",
                    instance_id=instance,
                ))  # fmt: skip
            case ("wait", judge, raise_floor, dt):
                due = next_due(d.state, lease_floor=floor)
                # Nothing is due before the timer says: the scan agrees at a point
                # just before it (and at the step's start).
                for probe in (now, min(due, now + dt) - 2e-5):
                    if now <= probe < due:
                        assert scan(d.state, probe, lease_floor=floor) == [], (probe, due)
                now += dt
                if raise_floor == 2:
                    floor = max(floor, now - 1.0)
                expected = scan(d.state, now, lease_floor=floor, judge_leases=judge)
                got = tick(d.state, now, lease_floor=floor, judge_leases=judge)
                assert got == expected
                for e in got:
                    evolve(d.state, e)


def test_next_due_is_the_lease_end_and_then_the_expiry():
    d = Driver()
    d.ingress(ServiceRegistered(event_id="", tenant="t1", ts=100.0, service_name="svc",
                                instance_id="a", host="h", port=1,
                                heartbeat_interval_s=1.0))  # fmt: skip
    assert math.isclose(next_due(d.state), 103.0, abs_tol=1e-4)
    d.ingress(HeartbeatReceived(event_id="", tenant="t1", ts=102.0, service_name="svc",
                                instance_id="a"))  # fmt: skip
    # A heartbeat moves the lease later; the timer finds out when the old end comes.
    assert tick(d.state, 103.0001) == []
    assert math.isclose(next_due(d.state), 105.0, abs_tol=1e-4)
    (change,) = tick(d.state, 105.0001)
    assert change.status == "critical"
    evolve(d.state, change)
    assert math.isclose(next_due(d.state), 105.0001 + POLICY.expire_after_s, abs_tol=1e-4)


def test_a_turn_looks_only_at_what_is_due():
    """10,000 instances with leases far away: a turn pops nothing and keeps them all."""
    d = Driver()
    for i in range(10_000):
        d.ingress(ServiceRegistered(event_id="", tenant="t1", ts=100.0, service_name="svc",
                                    instance_id=f"i{i}", host="h", port=1,
                                    heartbeat_interval_s=10.0))  # fmt: skip
    assert tick(d.state, 101.0) == []
    timers = d.state.timers
    assert timers is not None and len(timers.deadlines) == 10_000
    assert tick(d.state, 102.0) == [] and len(timers.deadlines) == 10_000


def test_a_late_heartbeat_that_brings_the_quiet_time_forward_is_seen():
    """A flapping instance is stable again after ``flap_quiet_s`` without a change in its
    reports; a late heartbeat (an older timestamp, delivered after a newer one) can move
    that time earlier, and the timer must not keep the later one."""
    d = Driver()
    beat = 0

    def hb(ts: float, status: str) -> None:
        nonlocal beat
        beat += 1
        d.ingress(HeartbeatReceived(event_id="", tenant="t1", ts=ts, service_name="svc",
                                    instance_id="a", status=status))  # fmt: skip

    d.ingress(ServiceRegistered(event_id="", tenant="t1", ts=100.0, service_name="svc",
                                instance_id="a", host="h", port=1,
                                heartbeat_interval_s=100.0))  # fmt: skip
    for i, status in enumerate(["degraded", "healthy", "degraded"]):
        hb(101.0 + i, status)
    inst = d.state.instances[("t1", "svc", "a")]
    assert inst.flapping
    assert tick(d.state, 103.5) == scan(d.state, 103.5) == []
    hb(110.0, "healthy")  # quiet until 115
    assert tick(d.state, 110.5) == scan(d.state, 110.5) == []
    hb(104.0, "degraded")  # late: the reports last changed at 104, quiet from 109
    expected = scan(d.state, 110.6)
    assert [type(e).__name__ for e in expected] == ["FlappingEnded"]
    assert tick(d.state, 110.6) == expected
