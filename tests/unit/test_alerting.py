"""The alert decisions in the pure core: lifecycle, grouping, silences, inhibition, outbox.

Every scenario runs through ``handlers.core.step`` (the one decision path) with event time
given by the test, and the recorded events are folded again from scratch at the end to
show that the fold alone gives the same alert state (what replay and a restart rely on).
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.model import (
    AlertFiring,
    AlertInhibited,
    AlertPending,
    AlertResolved,
    AlertRulesLoaded,
    Event,
    HeartbeatReceived,
    InfraChecked,
    InfraConfigLoaded,
    NotificationDue,
    NotificationSent,
    ServiceRegistered,
    SilenceCreated,
    SilenceExpired,
)
from handlers.alert_rules import (
    AlertingConfig,
    InhibitRule,
    Integration,
    Matcher,
    Receiver,
    Route,
    Rule,
    digest_of,
)
from handlers.core import Internal, TimerTurn, step
from handlers.registry import RegistryState, fold
from hub.config import HubConfig
from tests.strategies import EVENTS

T0 = 1_800_000_000.0
RULES = HubConfig()

CONFIG = AlertingConfig(
    rules=(
        Rule(name="ComponentDown", source="infra_unhealthy", severity="critical",
             annotations={"summary": "{component} is down"}),
        Rule(name="ServiceUnhealthy", source="service_unhealthy", severity="critical", for_s=10),
    ),
    route=Route(receiver="ops", group_by=("alertname", "tenant"), group_wait_s=5,
                group_interval_s=60, repeat_interval_s=3600),
    receivers=(Receiver(name="ops", integrations=(Integration(type="log"),
                                                  Integration(type="webhook", url="http://x"))),),
)  # fmt: skip


class Hub:
    """The core driven by hand: candidates at a given event time, everything recorded."""

    def __init__(self, config: AlertingConfig = CONFIG) -> None:
        self.state = RegistryState()
        self.log: list[Event] = []
        self.now = T0
        self.submit(AlertRulesLoaded(event_id="rules", tenant="_hub", ts=T0, source="test",
                                     digest=digest_of(config),
                                     config=config.to_data()))  # fmt: skip
        self.submit(InfraConfigLoaded(
            event_id="infra", tenant="_infra", ts=T0, source="test", digest="d",
            components=[{"name": "pg", "section": "databases", "type": "postgresql"}],
            service_dependencies={"orders": ["pg"]},
        ))  # fmt: skip

    def submit(self, *events: Event) -> list[Event]:
        out = step(self.state, self.now, [Internal(e) for e in events], RULES)
        self.log += out.record
        return out.record

    def at(self, t: float) -> list[Event]:
        """Let the timer run at T0 + t."""
        self.now = T0 + t
        out = step(self.state, self.now, [TimerTurn(lease_floor=T0, judge_leases=True)], RULES)
        self.log += out.record
        return out.record

    def check(self, component: str, healthy: bool) -> list[Event]:
        return self.submit(InfraChecked(
            event_id=f"chk{self.now}{component}{healthy}", tenant="_infra", ts=self.now,
            component=component, status="HEALTHY" if healthy else "UNHEALTHY",
            response_time_ms=1.0, error="" if healthy else "refused",
        ))  # fmt: skip


def due(events: list[Event]) -> list[NotificationDue]:
    return [e for e in events if isinstance(e, NotificationDue)]


def names(entries: list[dict[str, Any]]) -> list[str]:
    return sorted(e["labels"]["alertname"] for e in entries)


def test_a_component_down_fires_at_once_and_is_notified_after_group_wait_then_resolved():
    hub = Hub()
    hub.now = T0 + 1
    [_, _, firing] = hub.check("pg", healthy=False)
    assert isinstance(firing, AlertFiring)
    assert firing.labels["component"] == "pg" and firing.annotations["summary"] == "pg is down"
    assert due(hub.at(5.9)) == []  # group_wait runs from the first alert: T0+1+5
    first = due(hub.at(6))
    assert [n.receiver for n in first] == ["ops/log/0", "ops/webhook/1"]
    assert all(names(n.firing) == ["ComponentDown"] and n.resolved == [] for n in first)
    assert due(hub.at(30)) == []  # nothing new, no repeat yet
    hub.now = T0 + 40
    resolved = [e for e in hub.check("pg", healthy=True) if isinstance(e, AlertResolved)]
    assert len(resolved) == 1 and resolved[0].fired
    assert due(hub.at(65)) == []  # group_interval runs from the last notification (T0+6)
    second = due(hub.at(66))
    assert len(second) == 2 and all(n.firing == [] and names(n.resolved) == ["ComponentDown"]
                                    for n in second)  # fmt: skip
    assert due(hub.at(10_000)) == []  # resolved is said once; the group is gone
    assert hub.state.alerts.groups == {}
    assert len({n.notification_id for n in first + second}) == 4


def test_a_repeat_comes_after_repeat_interval_with_a_new_id_and_not_once_acknowledged():
    hub = Hub()
    hub.now = T0
    hub.check("pg", healthy=False)
    first = due(hub.at(5))
    assert due(hub.at(3604)) == []
    repeat = due(hub.at(3605))
    assert [n.epoch for n in repeat] == [1, 1]
    assert {n.notification_id for n in repeat}.isdisjoint({n.notification_id for n in first})
    from events.model import AlertAcknowledged

    fp = next(iter(hub.state.alerts.alerts))
    hub.submit(AlertAcknowledged(event_id="ack", tenant="_infra", ts=hub.now, fingerprint=fp,
                                 author="ana"))  # fmt: skip
    assert due(hub.at(3605 + 3600)) == []


def test_a_pending_alert_that_clears_before_for_is_never_notified():
    hub = Hub()
    register(hub, "orders", "o-1", at=0)
    hub.now = T0 + 1
    out = heartbeat(hub, "orders", "o-1", "unhealthy")
    assert [type(e) for e in out if type(e).__name__.startswith("Alert")] == [AlertPending]
    hub.now = T0 + 5
    out = heartbeat(hub, "orders", "o-1", "healthy")
    [resolved] = [e for e in out if isinstance(e, AlertResolved)]
    assert not resolved.fired
    assert due(hub.at(100)) == []


def test_a_dependent_service_is_inhibited_and_the_root_cause_names_it():
    hub = Hub()
    register(hub, "orders", "o-1", at=0)
    hub.now = T0 + 1
    hub.check("pg", healthy=False)
    hub.now = T0 + 2
    heartbeat(hub, "orders", "o-1", "unhealthy")  # orders needs pg: it fails too
    fired = hub.at(12)  # ServiceUnhealthy's for (10 s) ran out
    assert [e.rule for e in fired if isinstance(e, AlertFiring)] == ["ServiceUnhealthy"]
    inhibited = [e for e in hub.log if isinstance(e, AlertInhibited)]  # (from pending on)
    assert len(inhibited) == 1 and inhibited[0].reason == "orders requires component pg"
    notified = due(hub.log)
    assert notified and all(names(n.firing) == ["ComponentDown"] for n in notified)
    assert notified[0].firing[0]["impacted"] == ["default/orders"]
    assert due(hub.at(500)) == []  # the dependent's own group says nothing


def test_inhibit_rules_follow_alertmanager():
    config = AlertingConfig(
        rules=CONFIG.rules,
        route=CONFIG.route,
        receivers=CONFIG.receivers,
        inhibit_rules=(
            InhibitRule(
                source_matchers=(Matcher("alertname", "=", "ComponentDown"),),
                target_matchers=(Matcher("severity", "=", "critical"),),
                equal=("tenant",),
            ),
        ),
        derive_inhibitions=False,
    )
    hub = Hub(config)
    register(hub, "orders", "o-1", at=0)
    hub.now = T0 + 1
    hub.check("pg", healthy=False)
    heartbeat(hub, "orders", "o-1", "unhealthy")
    out = hub.at(12)
    # Not the same tenant (_infra vs default): the rule's `equal` keeps them apart.
    assert not [e for e in out if isinstance(e, AlertInhibited)]


def test_a_silenced_alert_is_not_notified_but_its_resolve_is_and_expiry_notifies_at_once():
    hub = Hub()
    hub.submit(SilenceCreated(event_id="s", tenant="_hub", ts=T0, silence_id="s1",
                              matchers=[{"name": "component", "op": "=", "value": "pg"}],
                              starts_at=T0, ends_at=T0 + 100, created_by="ana"))  # fmt: skip
    hub.now = T0 + 1
    hub.check("pg", healthy=False)
    assert due(hub.at(6)) == []  # silenced
    assert hub.state.alerts.alerts  # ... yet active
    hub.now = T0 + 20
    hub.check("pg", healthy=True)
    assert due(hub.at(65)) == []  # the group was looked at (T0+6): group_interval from there
    resolved = due(hub.at(66))
    assert len(resolved) == 2 and all(names(n.resolved) == ["ComponentDown"] for n in resolved)
    # Fires again under the silence; when the silence ends it is notified at once.
    hub.now = T0 + 70
    hub.check("pg", healthy=False)
    hub.check("pg", healthy=False)  # (from HEALTHY it takes two failed checks)
    assert due(hub.at(99)) == []
    at_end = hub.at(100)
    assert any(isinstance(e, SilenceExpired) for e in at_end)
    assert [names(n.firing) for n in due(at_end)] == [["ComponentDown"]] * 2


def test_the_fold_of_what_was_recorded_gives_the_same_alert_state():
    hub = Hub()
    register(hub, "orders", "o-1", at=0)
    hub.now = T0 + 1
    hub.check("pg", healthy=False)
    heartbeat(hub, "orders", "o-1", "unhealthy")
    sent = due(hub.at(12))
    for n in sent[:1]:
        hub.submit(NotificationSent(event_id=f"{n.notification_id}.sent", tenant="_hub",
                                    ts=hub.now, notification_id=n.notification_id,
                                    receiver=n.receiver))  # fmt: skip
    again = fold(hub.log)
    a, b = hub.state.alerts, again.alerts
    assert a.alerts == b.alerts and set(a.outbox) == set(b.outbox) == {sent[1].notification_id}
    assert {k: g.notified for k, g in a.groups.items()} == {
        k: g.notified for k, g in b.groups.items()}  # fmt: skip
    # A restarted hub (the fold) says nothing twice.
    again.alerts.everything = True
    out = step(again, hub.now + 1, [TimerTurn(lease_floor=T0, judge_leases=True)], RULES)
    assert due(out.record) == []


def register(hub: Hub, service: str, instance: str, *, at: float) -> None:
    hub.now = T0 + at
    hub.submit(ServiceRegistered(event_id=f"r{instance}", tenant="default", ts=hub.now,
                                 service_name=service, instance_id=instance, host="h",
                                 port=1, heartbeat_interval_s=1000))  # fmt: skip


def heartbeat(hub: Hub, service: str, instance: str, status: str) -> list[Event]:
    return hub.submit(HeartbeatReceived(event_id=f"hb{hub.now}", tenant="default", ts=hub.now,
                                        service_name=service, instance_id=instance,
                                        status=status))  # fmt: skip


def test_what_if_lists_the_alerts_a_lower_threshold_would_have_fired():
    """The history recorded with ServiceUnhealthy's `for` of 10 s (a service unhealthy for
    5 s: nothing fired), decided again with 2 s: one extra alert, and its notification;
    with the same rules: nothing extra, the same alerts as recorded."""
    from handlers.whatif import simulate

    hub = Hub()
    register(hub, "orders", "o-1", at=0)
    hub.now = T0 + 1
    heartbeat(hub, "orders", "o-1", "unhealthy")
    hub.now = T0 + 6
    heartbeat(hub, "orders", "o-1", "healthy")
    hub.now = T0 + 20
    hub.check("pg", healthy=False)  # fires with both rule sets
    hub.at(100)
    assert [e.rule for e in hub.log if isinstance(e, AlertFiring)] == ["ComponentDown"]

    same = simulate(hub.log, CONFIG)
    assert same.extra() == [] and same.missing() == []
    assert [e.rule for e in same.fired] == ["ComponentDown"]

    sooner = msgspec.structs.replace(CONFIG, rules=(
        CONFIG.rules[0], msgspec.structs.replace(CONFIG.rules[1], for_s=2)))  # fmt: skip
    result = simulate(hub.log, sooner)
    [extra] = result.extra()
    assert (extra.rule, extra.labels["service"]) == ("ServiceUnhealthy", "orders")
    assert (extra.active_since, extra.fired_at, extra.resolved_at) == (T0 + 1, T0 + 3, T0 + 6)
    assert len(result.notified) > len(same.notified)
    # From a time on: what happened before only builds the state.
    assert simulate(hub.log, sooner, since=T0 + 10).extra() == []


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(EVENTS, max_size=40))
def test_the_service_counts_kept_by_the_fold_equal_a_scan(events):
    """A service's live and trusted (healthy, steady) instances, kept by the fold for the
    alert rules on a service's health, are what a scan of its instances counts."""
    state = fold(events)
    scanned: dict[tuple[str, str], list[int]] = {}
    for (tenant, service, _), inst in state.instances.items():
        counts = scanned.setdefault((tenant, service), [0, 0])
        if inst.live:
            counts[0] += 1
            counts[1] += inst.status == "healthy" and not inst.flapping
    kept = {k: v for k, v in state.service_counts.items() if v != [0, 0]}
    assert kept == {k: v for k, v in scanned.items() if v != [0, 0]}
