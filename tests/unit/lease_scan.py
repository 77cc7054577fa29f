"""The lease timer as it was before deadlines: every live instance looked at on every
tick. Kept only as the reference the deadline timer is checked against."""

from __future__ import annotations

from collections import defaultdict

from events.model import Event, FlappingEnded
from handlers.liveness import _preservation, _timer_id, lease_deadline
from handlers.registry import CRITICAL, Instance, RegistryState, health_change


def scan(
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
