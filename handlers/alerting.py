"""Alert decisions (pure): from the registry's state and the clock to alert events.

``alert_pass(state, now, recorded)`` runs at the end of every turn of the core
(``handlers.core.step``), after the turn's other decisions: it looks at the subjects the
turn's recorded events touched (an instance, a service, a component, a tenant, the hub's
gauges), and at what is due (a ``for`` that ran out, a group to notify, a silence that
ends). It returns, in order, what to record, each folded at once:

* the lifecycle: ``AlertPending`` (the condition became true), ``AlertFiring`` (it held
  for the rule's ``for``), ``AlertResolved`` (it no longer holds);
* inhibition: ``AlertInhibited`` / ``AlertUninhibited``, from ``inhibit_rules`` and from
  the dependency graph (a service requiring a component or service whose alert fires);
* ``SilenceExpired`` at a silence's end;
* the outbox: ``NotificationDue`` per group and integration, with Alertmanager's
  ``group_wait`` / ``group_interval`` / ``repeat_interval``.

Every time is the event time ``now`` given by the caller; replay folds what was recorded
and decides nothing, and ``hub alerts simulate`` runs this with other rules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec

from events.model import (
    AlertFiring,
    AlertInhibited,
    AlertPending,
    AlertResolved,
    AlertUninhibited,
    Event,
    FlappingEnded,
    FlappingStarted,
    HubSampled,
    InfraConfigLoaded,
    InfraStatusChanged,
    InstanceExpired,
    InstanceHealthChanged,
    NotificationDue,
    NotificationSent,
    SelfPreservationEnded,
    SelfPreservationStarted,
    ServiceDeregistered,
    ServiceRegistered,
    SilenceExpired,
)
from events.vocab import Health, InfraStatus
from handlers.alert_rules import (
    GAUGES,
    HUB_TENANT,
    INFRA_TENANT,
    SEVERITIES,
    InhibitRule,
    Integration,
    Rule,
    fill,
    fingerprint,
    matches_all,
)
from handlers.alerts import (
    FIRING,
    Alert,
    AlertState,
    Group,
    episode,
    group_of,
    routes_for,
    schedule,
    told,
)
from handlers.registry import GONE, RegistryState, evolve

Subject = tuple[str, ...]
# ("component", name) | ("service", tenant, service) | ("instance", tenant, service, id)
# | ("tenant", tenant) | ("gauges",)

_INSTANCE_SOURCES = ("instance_critical", "instance_expired", "instance_flapping")
_SERVICE_SOURCES = ("service_degraded", "service_unhealthy")


def subjects_of(event: Event) -> Iterator[Subject]:
    """What a recorded event may change the conditions of."""
    match event:
        case (ServiceRegistered() | ServiceDeregistered() | InstanceHealthChanged()
              | InstanceExpired() | FlappingStarted() | FlappingEnded()):  # fmt: skip
            yield ("instance", event.tenant, event.service_name, event.instance_id)
            yield ("service", event.tenant, event.service_name)
        case InfraStatusChanged():
            yield ("component", event.component)
        case InfraConfigLoaded():
            yield ("components",)
        case SelfPreservationStarted() | SelfPreservationEnded():
            yield ("tenant", event.tenant)
        case HubSampled():
            yield ("gauges",)
        case _:
            return


# --- conditions -------------------------------------------------------------------------


def _labels(rule: Rule, tenant: str, source_labels: dict[str, str]) -> dict[str, str]:
    return {**source_labels, **rule.labels, "alertname": rule.name, "severity": rule.severity,
            "tenant": tenant}  # fmt: skip


def _conditions(
    state: RegistryState, subject: Subject, rules: Iterable[Rule]
) -> list[tuple[Rule, dict[str, str], float | None]]:
    """The rules whose condition holds for ``subject`` now: ``(rule, labels, value)``."""
    out: list[tuple[Rule, dict[str, str], float | None]] = []
    kind = subject[0]
    for rule in rules:
        src = rule.source
        held: dict[str, str] | None = None
        value: float | None = None
        if kind == "instance" and src in _INSTANCE_SOURCES:
            tenant, service, instance = subject[1], subject[2], subject[3]
            inst = state.instances.get((tenant, service, instance))
            if inst is not None and (
                (src == "instance_critical" and inst.status == Health.CRITICAL)
                or (src == "instance_expired" and inst.status == Health.EXPIRED)
                or (src == "instance_flapping" and inst.flapping and inst.live)
            ):
                held = _labels(rule, tenant, {"service": service, "instance": instance})
        elif kind == "service" and src in _SERVICE_SOURCES:
            tenant, service = subject[1], subject[2]
            health = service_health(state, tenant, service)
            if (src == "service_degraded" and health == "DEGRADED") or (
                src == "service_unhealthy" and health == "UNHEALTHY"
            ):
                held = _labels(rule, tenant, {"service": service})
        elif kind == "component" and src == "infra_unhealthy":
            comp = state.infra.components.get(subject[1])
            if comp is not None and comp.status == InfraStatus.UNHEALTHY:
                held = _labels(rule, INFRA_TENANT, {
                    "component": comp.name, "section": str(comp.config.get("section", "")),
                    "type": str(comp.config.get("type", "")),
                })  # fmt: skip
        elif kind == "tenant" and src == "self_preservation":
            if subject[1] in state.preservation:
                held = _labels(rule, subject[1], {})
        elif kind == "gauges" and src in GAUGES:
            value = state.alerts.gauges.get(src)
            if value is not None and rule.threshold is not None and value > rule.threshold:
                held = _labels(rule, HUB_TENANT, {})
        if held is not None and matches_all(rule.matchers, held):
            out.append((rule, held, value))
    return out


def service_health(state: RegistryState, tenant: str, service: str) -> str:
    """A service's health from its live instances (as ``hub.query.health`` says it):
    HEALTHY when every one is healthy and steady, UNHEALTHY when none is, DEGRADED
    between; "" when it has no live instance."""
    live, trusted = state.service_counts.get((tenant, service), (0, 0))
    if not live:
        return ""
    if trusted == live:
        return "HEALTHY"
    return "DEGRADED" if trusted else "UNHEALTHY"


def _subject_of_alert(alert: Alert, rule: Rule | None) -> Subject | None:
    labels = alert.labels
    src = rule.source if rule is not None else ""
    if src in _INSTANCE_SOURCES:
        return ("instance", labels.get("tenant", ""), labels.get("service", ""),
                labels.get("instance", ""))  # fmt: skip
    if src in _SERVICE_SOURCES:
        return ("service", labels.get("tenant", ""), labels.get("service", ""))
    if src == "infra_unhealthy":
        return ("component", labels.get("component", ""))
    if src == "self_preservation":
        return ("tenant", labels.get("tenant", ""))
    if src in GAUGES:
        return ("gauges",)
    return None  # the rule is gone, or a source decided elsewhere (event_log_down)


def _all_subjects(state: RegistryState) -> set[Subject]:
    subjects: set[Subject] = {("gauges",)}
    for tenant, service, instance in state.instances:
        subjects.add(("instance", tenant, service, instance))
        subjects.add(("service", tenant, service))
    subjects.update(("component", name) for name in state.infra.components)
    subjects.update(("tenant", t) for t in state.preservation)
    for alert in state.alerts.alerts.values():  # (what it was about may be gone)
        subject = _subject_of_alert(alert, state.alerts.rule(alert.rule))
        if subject is not None:
            subjects.add(subject)
    return subjects


def _expand(state: RegistryState, subject: Subject) -> Iterator[Subject]:
    if subject == ("components",):
        yield from (("component", n) for n in state.infra.components)
    else:
        yield subject


# --- the pass ---------------------------------------------------------------------------


def alert_pass(state: RegistryState, now: float, recorded: Iterable[Event]) -> list[Event]:
    """What the alerts decide at ``now`` after ``recorded`` (this turn's events)."""
    alerts = state.alerts
    if not alerts.loaded or not alerts.config.enabled:
        return []
    out: list[Event] = []

    def record(e: Event) -> None:
        evolve(state, e)
        out.append(e)

    if alerts.everything:  # after a fold, or new rules: alerts of removed rules resolve
        for alert in list(alerts.alerts.values()):  # (resolving one changes the dict)
            if alerts.rule(alert.rule) is None:
                record(_resolved(alert, now, "the rule was removed"))
        subjects = _all_subjects(state)
        alerts.everything = False
        recheck_inhibitions = True
    else:
        subjects = {s for e in recorded for s in subjects_of(e)}
        recheck_inhibitions = False
    due = alerts.deadlines.pop_due(now)
    for what, key in due:
        if what == "fire" and key in alerts.alerts:
            subject = _subject_of_alert(alerts.alerts[key], alerts.rule(alerts.alerts[key].rule))
            if subject is not None:
                subjects.add(subject)
    # Active alerts whose subject is looked at, by subject (a condition that no longer
    # holds resolves them).
    by_subject: dict[Subject, list[Alert]] = {}
    for alert in alerts.alerts.values() if subjects else ():
        subject = _subject_of_alert(alert, alerts.rule(alert.rule))
        if subject is not None:
            by_subject.setdefault(subject, []).append(alert)
    changed = False
    rules = alerts.config.rules
    for raw in subjects:
        for subject in _expand(state, raw):
            holding = _conditions(state, subject, rules)
            seen: set[str] = set()
            for rule, labels, value in holding:
                fp = fingerprint(rule.name, labels)
                seen.add(fp)
                changed |= _lifecycle(alerts, rule, fp, labels, value, now, record)
            for alert in by_subject.get(subject, []):
                if alert.fingerprint not in seen and alert.fingerprint in alerts.alerts:
                    record(_resolved(alert, now, "the condition no longer holds"))
                    changed = True
    if changed or recheck_inhibitions:
        _inhibitions(state, now, record)
    for what, key in due:
        if what == "silence":
            silence = alerts.silences.get(key)
            if silence is not None and silence.ends_at <= now:
                record(SilenceExpired(event_id=f"silence.{key}.ended", tenant=HUB_TENANT,
                                      ts=now, silence_id=key, reason="ended"))  # fmt: skip
    for group in sorted(alerts.groups.values(), key=lambda g: g.key):
        if group.flush_at is not None and group.flush_at <= now:
            _flush(state, group, now, record)
    return out


def next_due(state: RegistryState) -> float:
    """When ``alert_pass`` next has something due (``inf``: nothing)."""
    if not state.alerts.loaded:
        return float("inf")
    return state.alerts.deadlines.next()


def _lifecycle(
    alerts: AlertState, rule: Rule, fp: str, labels: dict[str, str], value: float | None,
    now: float, record: Any,
) -> bool:  # fmt: skip
    """Pending, then firing after ``for``; True if something was recorded."""
    alert = alerts.alerts.get(fp)
    if alert is not None and (alert.state == FIRING or now < alert.active_since + rule.for_s):
        return False
    since = alert.active_since if alert is not None else now
    annotations = {k: fill(v, labels, value) for k, v in rule.annotations.items()}
    stamp = f"alert.{fp}.{round(since * 1e6)}"
    kind = AlertPending if alert is None and rule.for_s > 0 else AlertFiring
    record(kind(event_id=f"{stamp}.{kind.kind.removeprefix('alert_')}", tenant=labels["tenant"],
                ts=now, fingerprint=fp, rule=rule.name, severity=rule.severity, labels=labels,
                annotations=annotations, active_since=since, value=value))  # fmt: skip
    return True


def _resolved(alert: Alert, now: float, reason: str) -> AlertResolved:
    return AlertResolved(
        event_id=f"alert.{alert.fingerprint}.{round(alert.active_since * 1e6)}.resolved",
        tenant=alert.labels.get("tenant", HUB_TENANT), ts=now, fingerprint=alert.fingerprint,
        rule=alert.rule, severity=alert.severity, labels=alert.labels,
        annotations=alert.annotations, active_since=alert.active_since,
        fired=alert.state == FIRING, reason=reason,
    )  # fmt: skip


# --- inhibition -------------------------------------------------------------------------


def requirements(state: RegistryState, tenant: str, service: str) -> set[str]:
    """What a service requires: its components (``service_dependencies``) and the
    services its live instances name in ``depends_on``."""
    needs = set(state.infra.service_dependencies.get(service, ()))
    for inst in state.by_service.get((tenant, service), {}).values():
        if inst.status not in GONE:
            needs.update(inst.depends_on)
    return needs


def dependents(state: RegistryState, alert: Alert) -> list[str]:
    """The services (``tenant/service``) that require what ``alert`` is about (none for
    an alert about one instance: not a root cause)."""
    if "instance" in alert.labels:
        return []
    component = alert.labels.get("component")
    service = alert.labels.get("service")
    tenant = alert.labels.get("tenant", "")
    out: set[str] = set()
    if component and tenant == INFRA_TENANT:
        for t, s in state.by_service:
            if component in requirements(state, t, s):
                out.add(f"{t}/{s}")
    elif service and "instance" not in alert.labels:
        for t, s in state.by_service:
            if t == tenant and s != service and service in requirements(state, t, s):
                out.add(f"{t}/{s}")
    return sorted(out)


def _inhibitions(state: RegistryState, now: float, record: Any) -> None:
    """Record what started or stopped inhibiting each active alert: the first firing
    alert (earliest first) that an inhibit rule names as its source, else (unless
    ``derive_inhibitions`` is off) a firing alert on what its service requires."""
    config = state.alerts.config
    active = state.alerts.alerts
    firing = sorted((a for a in active.values() if a.state == FIRING),
                    key=lambda a: (a.active_since, a.fingerprint))  # fmt: skip
    by_rule = [(i, rule, [s for s in firing if matches_all(rule.source_matchers, s.labels)])
               for i, rule in enumerate(config.inhibit_rules)]  # fmt: skip
    # What can be a root cause: a component down, a whole service (not one instance).
    components: dict[str, Alert] = {}
    services: dict[tuple[str, str], Alert] = {}
    for source in firing if config.derive_inhibitions else ():
        labels = source.labels
        if labels.get("component") and labels.get("tenant") == INFRA_TENANT:
            components.setdefault(labels["component"], source)
        elif labels.get("service") and "instance" not in labels:
            services.setdefault((labels.get("tenant", ""), labels["service"]), source)
    needs: dict[tuple[str, str], list[str]] = {}
    for target in sorted(active.values(), key=lambda a: a.fingerprint):
        found = _by_rule(target, by_rule)
        service = target.labels.get("service")
        if found is None and service and (components or services):
            key = (target.labels.get("tenant", ""), service)
            if key not in needs:
                needs[key] = sorted(requirements(state, *key))
            found = _by_dependency(target, needs[key], components, services)
        _inhibit(target, found, now, record)


def _by_rule(
    target: Alert, by_rule: list[tuple[int, InhibitRule, list[Alert]]]
) -> tuple[Alert, str] | None:
    for i, rule, sources in by_rule:
        if not sources or not matches_all(rule.target_matchers, target.labels):
            continue
        for source in sources:
            if source.fingerprint != target.fingerprint and all(
                source.labels.get(n, "") == target.labels.get(n, "") for n in rule.equal
            ):
                return source, f"inhibit_rules[{i}]"
    return None


def _by_dependency(
    target: Alert, needs: list[str], components: dict[str, Alert],
    services: dict[tuple[str, str], Alert],
) -> tuple[Alert, str] | None:  # fmt: skip
    service, tenant = target.labels["service"], target.labels.get("tenant", "")
    for name in needs:
        if name in components:
            return components[name], f"{service} requires component {name}"
        source = services.get((tenant, name))
        if source is not None and source.fingerprint != target.fingerprint:
            return source, f"{service} depends on service {name}"
    return None


def _inhibit(target: Alert, found: tuple[Alert, str] | None, now: float, record: Any) -> None:
    by = found[0].fingerprint if found else None
    if by == target.inhibited_by:
        return
    stamp = f"alert.{target.fingerprint}.{round(target.active_since * 1e6)}"
    at = round(now * 1e6)
    tenant = target.labels.get("tenant", HUB_TENANT)
    if target.inhibited_by is not None:
        was = target.inhibited_by
        record(AlertUninhibited(event_id=f"{stamp}.uninhibited.{was}.{at}", tenant=tenant,
                                ts=now, fingerprint=target.fingerprint, by=was))  # fmt: skip
    if found is not None:
        source, reason = found
        record(AlertInhibited(event_id=f"{stamp}.inhibited.{source.fingerprint}.{at}",
                              tenant=tenant, ts=now, fingerprint=target.fingerprint,
                              by=source.fingerprint, by_rule=source.rule,
                              reason=reason))  # fmt: skip


# --- notifications ----------------------------------------------------------------------


def notification_id(target: str, group_key: str, firing: Iterable[str], resolved: Iterable[str],
                    epoch: int) -> str:  # fmt: skip
    """Deterministic: the same notification is never due twice."""
    text = "\x00".join([target, group_key, ",".join(sorted(firing)), ",".join(sorted(resolved)),
                        str(epoch)])  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _flush(state: RegistryState, group: Group, now: float, record: Any) -> None:
    """Notify the group through each integration of its receiver, if there is news (or a
    repeat is due); then look at it again after ``repeat_interval``."""
    alerts = state.alerts
    group.flush_at = None
    group.last_flush = now  # the group's interval runs from here, news or not
    receiver = alerts.config.receiver(group.receiver)
    firing_alerts = [a for fp in sorted(group.members) if (a := alerts.alerts.get(fp))
                     and a.state == FIRING and a.inhibited_by is None
                     and not alerts.silenced_by(a.labels, now)]  # fmt: skip
    firing = [_entry(state, a) for a in firing_alerts]
    firing_set = frozenset(episode(f) for f in firing)
    all_acked = bool(firing_alerts) and all(a.acknowledged for a in firing_alerts)
    notes: list[NotificationDue] = []  # all decided before any is folded
    for target, integration in receiver.targets() if receiver else []:
        resolved = _resolved_for(integration, group)
        notified, at = group.notified.get(target, (frozenset(), 0.0))
        epoch = 0
        if firing_set == notified and not resolved:
            if not firing or all_acked or now < at + group.repeat_interval_s:
                continue
            epoch = group.epoch.get(target, 0) + 1  # a repeat
        if not firing and not resolved:
            continue
        nid = notification_id(target, group.key, firing_set, (episode(r) for r in resolved), epoch)
        severities = [e["severity"] for e in firing or resolved]
        notes.append(NotificationDue(
            event_id=f"notify.{nid}", tenant=HUB_TENANT, ts=now, notification_id=nid,
            receiver=target, group_key=group.key, group_labels=dict(group.labels),
            firing=firing, resolved=resolved, epoch=epoch,
            severity=min(severities, key=_rank),
        ))  # fmt: skip
    for note in notes:
        record(note)
    if group.key in alerts.groups:
        told(alerts, group, now)
        if any(a.state == FIRING for fp in group.members if (a := alerts.alerts.get(fp))):
            schedule(alerts, group, now + group.repeat_interval_s)


def _rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)


def _resolved_for(integration: Integration, group: Group) -> list[dict[str, Any]]:
    if not integration.send_resolved:
        return []
    return [r for _, r in sorted(group.resolved.items())
            if not r.get("inhibited")
            and (integration.send_resolved_when_silenced or not r.get("silenced"))]  # fmt: skip


def _entry(state: RegistryState, alert: Alert) -> dict[str, Any]:
    entry = alert.summary()
    impacted = dependents(state, alert)
    if impacted:
        entry["impacted"] = impacted
    return entry


# --- the event log down -----------------------------------------------------------------


def outage_alerts(state: RegistryState, log_name: str, since: float) -> list[Alert]:
    """The alerts of the rules on ``event_log_down`` for an outage of ``log_name`` that
    began at ``since`` (firing; not folded: the log cannot be written)."""
    out: list[Alert] = []
    for rule in state.alerts.config.rules:
        if rule.source != "event_log_down":
            continue
        labels = _labels(rule, HUB_TENANT, {"log": log_name})
        if not matches_all(rule.matchers, labels):
            continue
        annotations = {k: fill(v, labels, None) for k, v in rule.annotations.items()}
        out.append(Alert(fingerprint(rule.name, labels), rule.name, rule.severity, labels,
                         annotations, since, FIRING, fired_at=since + rule.for_s))  # fmt: skip
    return out


def outage_due_at(state: RegistryState, alert: Alert) -> float:
    """When the outage's notification is due: its rule's ``for`` and its route's
    ``group_wait`` after the outage began (the first route it takes)."""
    routed = routes_for(state.alerts.config.route, alert.labels)[0]
    return alert.fired_at + routed.group_wait_s


def outage_notifications(state: RegistryState, alert: Alert) -> list[NotificationDue]:
    """What the groups of ``alert`` would be notified (one per integration), as the
    hub says it out of band while the log is down and records once it is back."""
    out: list[NotificationDue] = []
    entry = [alert.summary()]
    ep = frozenset(episode(e) for e in entry)
    for routed in routes_for(state.alerts.config.route, alert.labels):
        key, labels = group_of(routed, alert.labels)
        receiver = state.alerts.config.receiver(routed.receiver)
        for target, _ in receiver.targets() if receiver else []:
            nid = notification_id(target, key, ep, (), 0)
            out.append(NotificationDue(
                event_id=f"notify.{nid}", tenant=HUB_TENANT, ts=outage_due_at(state, alert),
                notification_id=nid, receiver=target, group_key=key, group_labels=labels,
                firing=entry, severity=alert.severity, out_of_band=True,
            ))  # fmt: skip
    return out


def decide_outage(
    state: RegistryState, now: float, log_name: str, since: float, until: float | None,
    reached: dict[str, list[str]],
) -> list[Event]:  # fmt: skip
    """Record an outage of the event log once it can be written again: the alert (fired
    late, at its time) and, for the notifications already said out of band
    (``reached``: notification id -> integrations that took it), that they were sent;
    the others are due now. ``until``: when it ended (None: not yet)."""
    out: list[Event] = []

    def record(e: Event) -> None:
        evolve(state, e)
        out.append(e)

    for alert in outage_alerts(state, log_name, since):
        rule = state.alerts.rule(alert.rule)
        lasted = (until if until is not None else now) - since
        if rule is None or lasted < rule.for_s or alert.fingerprint in state.alerts.alerts:
            continue  # too short to fire, or recorded already
        stamp = f"alert.{alert.fingerprint}.{round(since * 1e6)}"
        record(AlertFiring(event_id=f"{stamp}.firing", tenant=HUB_TENANT, ts=now,
                           fingerprint=alert.fingerprint, rule=alert.rule,
                           severity=alert.severity, labels=alert.labels,
                           annotations=alert.annotations, active_since=since,
                           recorded_late=True))  # fmt: skip
        for due in outage_notifications(state, alert):
            if due.notification_id not in reached:
                continue  # not said: the group's own flush says it
            record(msgspec.structs.replace(due, ts=now))
            for target in reached[due.notification_id]:
                if target == due.receiver:
                    record(NotificationSent(event_id=f"{due.notification_id}.sent",
                                            tenant=HUB_TENANT, ts=now,
                                            notification_id=due.notification_id,
                                            receiver=target, out_of_band=True))  # fmt: skip
        if until is not None:
            fired = state.alerts.alerts.get(alert.fingerprint)
            if fired is not None:
                record(msgspec.structs.replace(
                    _resolved(fired, now, f"the {log_name} log can be written again"),
                    recorded_late=True))  # fmt: skip
    return out


__all__ = ["alert_pass", "dependents", "next_due", "service_health", "subjects_of"]
