"""Lease decisions taken on the hub's timer (pure): critical, expiry, flapping end,
self-preservation.

``tick(state, now, ...)`` returns the events to record at time ``now``; the hub
records them like any other event and folds them with ``evolve``, so replay
applies the decisions and never takes them again.
"""

from __future__ import annotations

from collections import defaultdict

from events.model import (
    Event,
    FlappingEnded,
    InstanceExpired,
    SelfPreservationEnded,
    SelfPreservationStarted,
)
from handlers.registry import CRITICAL, Instance, RegistryState, health_change

AT_RISK_LISTED = 100


def lease_deadline(inst: Instance, lease_floor: float) -> float:
    """When ``inst`` lapses without another heartbeat. ``lease_floor`` (the time the
    hub started) gives every instance a full TTL after a hub restart: heartbeats
    sent while the hub was down are in the ingress stream, not yet in its state."""
    return max(inst.last_seen, lease_floor) + inst.ttl_s


def _timer_id(kind: str, subject: str, now: float) -> str:
    return f"hub-{kind}-{subject}@{now:.6f}"


def tick(
    state: RegistryState, now: float, *, lease_floor: float = 0.0, judge_leases: bool = True
) -> list[Event]:
    """The decisions due at ``now``.

    Args:
        lease_floor: see ``lease_deadline``.
        judge_leases: False while the hub lags behind its ingress: then it has not
            seen the latest heartbeats and takes no lease decision (critical,
            expiry) at all; flapping and self-preservation still end on time.
    """
    policy = state.policy
    out: list[Event] = []
    live: dict[str, int] = defaultdict(int)
    critical: dict[str, int] = defaultdict(int)
    due: dict[str, list[Instance]] = defaultdict(list)
    for inst in state.instances.values():
        if not inst.live:
            continue
        t = inst.tenant
        live[t] += 1
        lapsed = judge_leases and now > lease_deadline(inst, lease_floor)
        if inst.flapping:
            quiet_since = max(inst.reported_changed_at, inst.status_since)
            if now - quiet_since >= policy.flap_quiet_s:
                status = CRITICAL if lapsed else inst.reported
                subject = f"{t}/{inst.service_name}/{inst.instance_id}"
                out.append(FlappingEnded(
                    event_id=_timer_id("flapping-ended", subject, now), tenant=t, ts=now,
                    service_name=inst.service_name, instance_id=inst.instance_id,
                    previous=inst.status, status=status, quiet_s=now - quiet_since,
                ))  # fmt: skip
                critical[t] += status == CRITICAL
            else:
                critical[t] += inst.status == CRITICAL
            continue
        if lapsed and inst.status != CRITICAL:
            silent = now - inst.last_seen
            subject = f"{t}/{inst.service_name}/{inst.instance_id}"
            change = health_change(
                inst, CRITICAL,
                f"no heartbeat for {silent:.1f} s (ttl {inst.ttl_s:g} s)",
                event_id=_timer_id("lapsed", subject, now), ts=now, policy=policy,
            )  # fmt: skip
            out.append(change)
            critical[t] += 1
        elif inst.status == CRITICAL:
            critical[t] += 1
            if judge_leases and now >= inst.status_since + inst.expire_after_s:
                due[t].append(inst)
    for t in sorted(set(live) | set(state.preservation)):
        out.extend(_preservation(state, t, now, live[t], critical[t], due.get(t, [])))
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
        elif critical < policy.preservation_min or share < policy.preservation_share / 2:
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
