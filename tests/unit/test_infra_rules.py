"""Infrastructure status as pure decisions: UNKNOWN until the first result, a threshold
of consecutive failures before a healthy component is called UNHEALTHY, one pass to
recover; and compaction of check results changes no view."""

from __future__ import annotations

from events.model import Event, InfraChecked, InfraConfigLoaded, InfraStatusChanged, compaction_key
from handlers import LivenessPolicy, RegistryState, react
from projections.fold import fold_view
from projections.postgres_render import expected_pg
from projections.redis_render import canonical_redis, expected_redis


def loaded(*names: str, ts: float = 0.0) -> InfraConfigLoaded:
    return InfraConfigLoaded(
        event_id=f"cfg@{ts}", tenant="_infra", ts=ts, source="t.yaml", digest="-".join(names),
        components=[{"name": n, "port": 1} for n in names], service_dependencies={"api": ["db"]},
    )  # fmt: skip


def checked(component: str, ok: bool, ts: float) -> InfraChecked:
    return InfraChecked(
        event_id=f"infra-{component}@{ts}", tenant="_infra", ts=ts, component=component,
        status="HEALTHY" if ok else "UNHEALTHY", response_time_ms=1.5,
        error="" if ok else "connection refused",
    )  # fmt: skip


class Hub:
    def __init__(self, trip: int = 3) -> None:
        self.state = RegistryState(policy=LivenessPolicy(infra_failures_to_trip=trip))
        self.log: list[Event] = []

    def feed(self, event: Event) -> list[Event]:
        _, out = react(self.state, event, now=event.ts)
        self.log += out
        return out

    def changes(self, event: Event) -> list[tuple[str, str]]:
        return [(e.previous, e.status) for e in self.feed(event)
                if isinstance(e, InfraStatusChanged)]  # fmt: skip


def test_first_result_sets_the_status_at_once_whatever_it_is():
    hub = Hub()
    hub.feed(loaded("db", "cache"))
    assert hub.changes(checked("db", True, 1)) == [("UNKNOWN", "HEALTHY")]
    assert hub.changes(checked("cache", False, 1)) == [("UNKNOWN", "UNHEALTHY")]
    assert hub.state.infra.components["cache"].consecutive_failures == 1


def test_a_healthy_component_trips_only_after_the_threshold_and_recovers_on_one_pass():
    hub = Hub(trip=3)
    hub.feed(loaded("db"))
    hub.feed(checked("db", True, 1))
    assert hub.changes(checked("db", False, 2)) == []  # one lost packet is not an outage
    assert hub.changes(checked("db", False, 3)) == []
    out = hub.feed(checked("db", False, 4))
    change = out[-1]
    assert isinstance(change, InfraStatusChanged)
    assert (change.previous, change.status, change.consecutive_failures) == (
        "HEALTHY", "UNHEALTHY", 3)  # fmt: skip
    assert "3 consecutive failed check(s): connection refused" in change.reason
    assert hub.changes(checked("db", False, 5)) == []
    assert hub.changes(checked("db", True, 6)) == [("UNHEALTHY", "HEALTHY")]
    assert hub.state.infra.components["db"].consecutive_failures == 0


def test_a_pass_between_failures_resets_the_count():
    hub = Hub(trip=2)
    hub.feed(loaded("db"))
    hub.feed(checked("db", True, 1))
    for t, ok in [(2, False), (3, True), (4, False), (5, True)]:
        assert hub.changes(checked("db", ok, t)) == []


def test_results_of_components_no_longer_configured_are_not_recorded():
    hub = Hub()
    hub.feed(loaded("db", "old"))
    hub.feed(loaded("db", ts=1))
    assert hub.feed(checked("old", True, 2)) == []
    assert set(hub.state.infra.components) == {"db"}


def test_the_log_without_superseded_check_results_folds_to_the_same_views():
    hub = Hub(trip=2)
    hub.feed(loaded("db", "cache"))
    pattern = [True, False, False, True, False, True, True, False, False, False]
    for t, ok in enumerate(pattern * 3, start=1):
        hub.feed(checked("db", ok, float(t)))
        hub.feed(checked("cache", not ok, float(t)))
        if t == 12:
            hub.feed(loaded("db", ts=t))  # cache removed...
        if t == 20:
            hub.feed(loaded("db", "cache", ts=t))  # ...and back
    keys = [compaction_key(e) for e in hub.log]
    last = {k: i for i, k in enumerate(keys) if k}
    kept = [e for i, e in enumerate(hub.log) if keys[i] is None or last[keys[i]] == i]
    assert len(kept) < len(hub.log) // 2

    def render(log):
        view = fold_view(log)
        return expected_pg(view), {k: canonical_redis(k, v)
                                   for k, v in expected_redis(view).items()}  # fmt: skip

    assert render(kept) == render(hub.log)
