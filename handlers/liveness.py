"""Lease decisions taken on the hub's timer (pure): critical, expiry, flapping end,
self-preservation.

``tick(state, now, ...)`` returns the events to record at time ``now``; the hub
records them like any other event and folds them with ``evolve``, so replay
applies the decisions and never takes them again.
"""

from __future__ import annotations

import math
from collections import defaultdict

from events.model import (
    Event,
    FlappingEnded,
    InstanceExpired,
    SelfPreservationEnded,
    SelfPreservationStarted,
)
from handlers.deadlines import TimerState
from handlers.registry import (
    CRITICAL,
    Instance,
    InstanceKey,
    LivenessPolicy,
    RegistryState,
    health_change,
)

AT_RISK_LISTED = 100


def lease_deadline(inst: Instance, lease_floor: float) -> float:
    """When ``inst`` lapses without another heartbeat. ``lease_floor`` (the time the
    hub started) gives every instance a full TTL after a hub restart: heartbeats
    sent while the hub was down are in the ingress stream, not yet in its state."""
    return max(inst.last_seen, lease_floor) + inst.ttl_s


def _timer_id(kind: str, subject: str, now: float) -> str:
    return f"hub-{kind}-{subject}@{now:.6f}"


EARLY_S = 1e-5  # deadlines sit this much early: a rule is re-checked exactly when it comes


def next_check(inst: Instance, policy: LivenessPolicy, lease_floor: float) -> float:
    """The earliest time a timer decision about ``inst`` can be due (a lower bound: a
    heartbeat since only moves it later), ``inf`` for an instance that is not live."""
    if not inst.live:
        return math.inf
    if inst.flapping:
        at = max(inst.reported_changed_at, inst.status_since) + policy.flap_quiet_s
    elif inst.status == CRITICAL:
        at = inst.status_since + inst.expire_after_s
    else:
        at = lease_deadline(inst, lease_floor)
    return at - EARLY_S


def _timers(state: RegistryState, lease_floor: float) -> TimerState[InstanceKey]:
    """The state's timer, built from one pass over the registry the first time (or when
    the lease floor moved back, which can only happen in tests and tools)."""
    timers = state.timers
    if timers is None or lease_floor < timers.floor:
        timers = state.timers = TimerState(floor=lease_floor)
        for key, inst in state.instances.items():
            if inst.live:
                timers.deadlines.push(next_check(inst, state.policy, lease_floor), key)
    timers.floor = lease_floor
    for key in timers.touched:
        timers.deadlines.push(next_check(state.instances[key], state.policy, lease_floor), key)
    timers.touched.clear()
    return timers


def next_due(state: RegistryState, *, lease_floor: float = 0.0, judge_leases: bool = True) -> float:
    """When ``tick`` may next have something to decide (``inf``: nothing scheduled).
    Called after the state changed, it also schedules what the change touched."""
    timers = _timers(state, lease_floor)
    due = timers.deadlines.next()
    if any(t not in state.preservation for t in timers.held):
        return -math.inf  # a self-preservation period ended: what it held is due
    if judge_leases and timers.deferred:
        return -math.inf  # leases are judged again: what waited for it is due
    for tenant, period in state.preservation.items():
        if _recovered(state, tenant, state.live_count.get(tenant, 0),
                      state.critical_count.get(tenant, 0)):  # fmt: skip
            return -math.inf
        due = min(due, period.until)
    return due


def _recovered(state: RegistryState, tenant: str, live: int, critical: int) -> bool:
    """Whether a tenant in self-preservation has recovered (with these counts)."""
    policy = state.policy
    share = critical / live if live else 0.0
    return critical < policy.preservation_min or share < policy.preservation_share / 2


def tick(
    state: RegistryState, now: float, *, lease_floor: float = 0.0, judge_leases: bool = True
) -> list[Event]:
    """The decisions due at ``now``.

    Only instances whose deadline has come are looked at (see ``handlers.deadlines``):
    the cost grows with what is due, not with the fleet. The decisions are those of
    looking at every live instance (the rules below), in the registry's order.

    Args:
        lease_floor: see ``lease_deadline``.
        judge_leases: False while the hub lags behind its ingress: then it has not
            seen the latest heartbeats and takes no lease decision (critical,
            expiry) at all; flapping and self-preservation still end on time.
    """
    policy = state.policy
    timers = _timers(state, lease_floor)
    keys = timers.deadlines.pop_due(now)
    if judge_leases and timers.deferred:
        keys += timers.deferred
        timers.deferred = set()
    for t in [t for t in timers.held if t not in state.preservation]:
        keys += timers.held.pop(t)
    looked: dict[InstanceKey, Instance] = {}
    for key in keys:
        inst = state.instances[key]
        if inst.live:
            looked[key] = inst
    decided: list[tuple[int, Event]] = []
    critical = dict(state.critical_count)  # after this turn's decisions
    due: dict[str, list[Instance]] = defaultdict(list)
    again = math.nextafter(now, math.inf)
    for key, inst in looked.items():
        t = inst.tenant
        deadline = lease_deadline(inst, lease_floor)
        lapsed = judge_leases and now > deadline
        later = max(next_check(inst, policy, lease_floor), again)
        if inst.flapping:
            quiet_since = max(inst.reported_changed_at, inst.status_since)
            if now - quiet_since >= policy.flap_quiet_s:
                status = CRITICAL if lapsed else inst.reported
                subject = f"{t}/{inst.service_name}/{inst.instance_id}"
                decided.append((inst.order, FlappingEnded(
                    event_id=_timer_id("flapping-ended", subject, now), tenant=t, ts=now,
                    service_name=inst.service_name, instance_id=inst.instance_id,
                    previous=inst.status, status=status, quiet_s=now - quiet_since,
                )))  # fmt: skip
                critical[t] = critical.get(t, 0) + (status == CRITICAL) - (inst.status == CRITICAL)
                continue  # folding the decision schedules it again (evolve touches it)
            timers.deadlines.push(later, key)
            continue
        if inst.status != CRITICAL:
            if lapsed:
                silent = now - inst.last_seen
                subject = f"{t}/{inst.service_name}/{inst.instance_id}"
                decided.append((inst.order, health_change(
                    inst, CRITICAL,
                    f"no heartbeat for {silent:.1f} s (ttl {inst.ttl_s:g} s)",
                    event_id=_timer_id("lapsed", subject, now), ts=now, policy=policy,
                )))  # fmt: skip
                critical[t] = critical.get(t, 0) + 1
                continue
            elif not judge_leases and now > deadline:
                timers.deferred.add(key)
                continue
        elif now >= inst.status_since + inst.expire_after_s:
            if not judge_leases:
                timers.deferred.add(key)
                continue
            due[t].append(inst)
            continue  # expires, or is held below
        timers.deadlines.push(later, key)
    out = [e for _, e in sorted(decided, key=lambda d: d[0])]
    for t in sorted(set(due) | set(state.preservation)):
        insts = sorted(due.get(t, []), key=lambda i: i.order)
        decisions = _preservation(
            state, t, now, state.live_count.get(t, 0), critical.get(t, 0), insts
        )
        out.extend(decisions)
        if not any(isinstance(d, InstanceExpired) for d in decisions):
            # Self-preservation holds them: looked at again once it ends.
            timers.held.setdefault(t, set()).update(
                (t, i.service_name, i.instance_id) for i in insts
            )
    return out


def _preservation(
    state: RegistryState, tenant: str, now: float, live: int, critical: int, due: list[Instance]
) -> list[Event]:
    """Self-preservation for one tenant, then the expiries it allows."""
    policy = state.policy
    share = critical / live if live else 0.0
    period = state.preservation.get(tenant)
    if period is not None:
        if now >= period.until:
            reason = "bound_reached"
        elif _recovered(state, tenant, live, critical):
            reason = "recovered"
        else:
            return []  # nothing expires while preserving
        return [SelfPreservationEnded(
            event_id=_timer_id("preservation-ended", tenant, now), tenant=tenant, ts=now,
            reason=reason, critical=critical, live=live,
        )]  # fmt: skip
    if not due:
        return []
    mass = critical >= policy.preservation_min and share >= policy.preservation_share
    if mass and now >= state.preservation_cooldown.get(tenant, 0.0):
        at_risk = sorted(
            f"{i.service_name}/{i.instance_id}"
            for i in state.instances.values()
            if i.tenant == tenant and i.live and i.status == CRITICAL
        )
        return [SelfPreservationStarted(
            event_id=_timer_id("preservation-started", tenant, now), tenant=tenant, ts=now,
            critical=critical, live=live, share=round(share, 4),
            until=now + policy.preservation_max_s, at_risk=at_risk[:AT_RISK_LISTED],
        )]  # fmt: skip
    return [_expired(tenant, i, now) for i in due]


def _expired(tenant: str, i: Instance, now: float) -> InstanceExpired:
    return InstanceExpired(
        event_id=_timer_id("expired", f"{tenant}/{i.service_name}/{i.instance_id}", now),
        tenant=tenant, ts=now, service_name=i.service_name, instance_id=i.instance_id,
        last_seen=i.last_seen, critical_since=i.status_since,
        reason=f"critical for {now - i.status_since:.1f} s (expire after {i.expire_after_s:g} s)",
    )  # fmt: skip
