"""The batch planner both projections apply a batch with (``projections.batch``): it
sorts every record where the views need it, its fold of the touched instances is the
whole fold's, and its heartbeat shortcut only ever skips fields a heartbeat cannot
change."""

from __future__ import annotations

import copy
from typing import get_args

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from events.log import LogRecord
from events.model import (
    ALERT_EVENTS,
    HEALTH_EVENTS,
    INFRA_EVENTS,
    Event,
    HeartbeatReceived,
    InfraChecked,
    InputRejected,
    InstanceHealthChanged,
    SelfPreservationEnded,
    SelfPreservationStarted,
    ServiceRegistered,
)
from handlers.registry import InstanceEvent, key_of
from projections.batch import MEMBERSHIP_EVENTS, fold_instances, plan_batch
from projections.canonical import HEARTBEAT_FIELDS
from projections.fold import fold_view
from projections.postgres_render import REGISTRY_COLUMNS, pg_heartbeat_row, pg_registry_row
from projections.redis_render import redis_instance_hash
from tests.strategies import EVENTS, HEARTBEAT

INSTANCE_EVENTS = get_args(InstanceEvent)


def numbered(events: list[Event], start: int = 1) -> list[Event]:
    """The events with the ids ingest gives them (``ingress-<seq>``)."""
    return [msgspec.structs.replace(e, event_id=f"ingress-{n}", ingress_seq=n)
            for n, e in enumerate(events, start)]  # fmt: skip


def records(events: list[Event]) -> list[LogRecord]:
    return [LogRecord(0, n, e) for n, e in enumerate(events)]


@settings(max_examples=300)
@given(st.lists(EVENTS, max_size=40))
def test_a_plan_puts_every_record_where_the_views_need_it(events: list[Event]) -> None:
    """Every record lands in the plan, in log order: instance events (heartbeats
    included) to fold, each touched instance once in the order first touched (marked
    when only heartbeats touch it), the services whose membership may change, the
    tenants registering, rejections, the health history, each tenant's last word on
    self-preservation, infrastructure events, alert events."""
    events = numbered(events)
    plan = plan_batch(records(events))
    instance_events = [e for e in events if isinstance(e, INSTANCE_EVENTS)]
    assert plan.instance_events == instance_events
    touched = list(dict.fromkeys(key_of(e) for e in instance_events))  # type: ignore[arg-type]
    assert list(plan.instances) == touched
    for k in touched:
        of_k = [e for e in instance_events if key_of(e) == k]  # type: ignore[arg-type]
        assert plan.instances[k] == all(isinstance(e, HeartbeatReceived) for e in of_k)
    assert list(plan.membership) == list(dict.fromkeys(
        key_of(e)[:2] for e in instance_events if isinstance(e, MEMBERSHIP_EVENTS)))  # type: ignore[arg-type]  # fmt: skip
    assert plan.registered == {e.tenant for e in events if isinstance(e, ServiceRegistered)}
    assert plan.rejections == [e for e in events if isinstance(e, InputRejected)]
    assert plan.health == [e for e in events if isinstance(e, HEALTH_EVENTS)]
    assert plan.infra == [e for e in events if isinstance(e, INFRA_EVENTS)]
    assert plan.alerts == [e for e in events if isinstance(e, ALERT_EVENTS)]
    last_word: dict[str, SelfPreservationStarted | None] = {}
    for e in events:
        if isinstance(e, SelfPreservationStarted):
            last_word[e.tenant] = e
        elif isinstance(e, SelfPreservationEnded):
            last_word[e.tenant] = None
    assert plan.preservation == last_word
    kept = {id(e) for e in [*plan.instance_events, *plan.rejections, *plan.health, *plan.infra,
                            *plan.alerts]}  # fmt: skip
    assert kept == {id(e) for e in events}, "a record the plan left out"


@settings(max_examples=300)
@given(st.lists(EVENTS, max_size=30), st.lists(st.one_of(EVENTS, HEARTBEAT), max_size=30))
def test_folding_only_the_touched_instances_gives_what_the_whole_fold_gives(
    history: list[Event], batch: list[Event]
) -> None:
    """Folding a batch over just the instances it touches (as a view holds them after
    ``history``) gives each of them exactly as the fold of the whole log does (None:
    an instance neither the view nor the batch has)."""
    history, batch = numbered(history), numbered(batch, len(history) + 1)
    held = fold_view(history).registry.instances
    plan = plan_batch(records(batch))
    known = {k: copy.deepcopy(held[k]) for k in plan.instances if k in held}
    touched = fold_instances(plan, known)
    whole = fold_view(history + batch).registry.instances
    assert [k for k, _, _ in touched] == list(plan.instances)
    for k, instance, _ in touched:
        assert instance == whole.get(k), k


@settings(max_examples=300)
@given(st.lists(EVENTS, min_size=1, max_size=30), st.lists(EVENTS, max_size=4), st.data())
def test_the_heartbeat_shortcut_skips_only_fields_a_heartbeat_cannot_change(
    history: list[Event], others: list[Event], data: st.DataObject
) -> None:
    """An instance marked ``heartbeats_only`` is one only heartbeats touched and that
    the view holds exactly as known (``exact``, a random part of what it holds): its
    PostgreSQL row and its Redis hash after the batch differ from before only in the
    heartbeat fields (which ``pg_heartbeat_row`` renders as the row does), so writing
    just those leaves the view equal to the fold. (The batch: mostly heartbeats of
    instances the history has, a few other events.)"""
    held = fold_view(numbered(history)).registry.instances
    beats = data.draw(st.lists(st.tuples(st.sampled_from(sorted(held)), HEARTBEAT), max_size=20)
                      if held else st.just([]), label="heartbeats")  # fmt: skip
    batch = [msgspec.structs.replace(hb, tenant=t, service_name=s, instance_id=i)
             for (t, s, i), hb in beats] + others  # fmt: skip
    batch = data.draw(st.permutations(batch), label="batch")
    plan = plan_batch(records(numbered(batch, len(history) + 1)))
    known = {k: copy.deepcopy(held[k]) for k in plan.instances if k in held}
    exact = set(known) - data.draw(st.sets(st.sampled_from(sorted(known))) if known
                                   else st.just(set()), label="not exactly known")  # fmt: skip
    rows = {k: pg_registry_row(i) for k, i in known.items()}
    hashes = {k: redis_instance_hash(i) for k, i in known.items()}
    for k, instance, heartbeats_only in fold_instances(plan, known, exact):
        assert heartbeats_only == (plan.instances[k] and k in exact)
        if not heartbeats_only:
            continue
        assert instance is not None
        row = pg_registry_row(instance)
        changed = {c for c, a, b in zip(REGISTRY_COLUMNS, rows[k], row, strict=True) if a != b}
        assert changed <= set(HEARTBEAT_FIELDS), changed
        short = dict(zip(("id", *HEARTBEAT_FIELDS), pg_heartbeat_row(instance), strict=True))
        assert short == {c: row[REGISTRY_COLUMNS.index(c)] for c in short}
        after, before = redis_instance_hash(instance), hashes[k]
        changed = {f for f in after.keys() | before.keys() if after.get(f) != before.get(f)}
        assert changed <= set(HEARTBEAT_FIELDS), changed


def test_a_plan_by_example() -> None:
    """Three heartbeats of a registered instance: one touched instance, heartbeats only,
    at the last heartbeat; a health change among them takes the shortcut away; a
    heartbeat of an instance nobody registered touches nothing that exists."""
    reg = ServiceRegistered(event_id="r", tenant="t", ts=1.0, service_name="s", instance_id="i",
                            host="h", port=1)  # fmt: skip
    beats = [HeartbeatReceived(event_id=f"b{n}", tenant="t", ts=2.0 + n, service_name="s",
                               instance_id="i", load=n / 10) for n in range(3)]  # fmt: skip
    stranger = HeartbeatReceived(event_id="x", tenant="t", ts=9.0, service_name="s",
                                 instance_id="nobody")  # fmt: skip
    check = InfraChecked(event_id="c", tenant="_infra", ts=3.0, component="pg",
                         status="HEALTHY", response_time_ms=1.0)  # fmt: skip
    held = fold_view([reg]).registry.instances
    plan = plan_batch(records([*beats, check, stranger]))
    (key, instance, heartbeats_only), unknown = fold_instances(plan, dict(held), exact=held)
    assert key == ("t", "s", "i") and heartbeats_only
    assert instance is not None and instance.load == 0.2
    assert unknown == (("t", "s", "nobody"), None, False)
    assert plan.infra == [check]

    changed = InstanceHealthChanged(event_id="h", tenant="t", ts=3.5, service_name="s",
                                    instance_id="i", previous="healthy", status="degraded",
                                    reason="reported")  # fmt: skip
    held = fold_view([reg]).registry.instances
    plan = plan_batch(records([beats[0], changed, beats[1]]))
    ((_, instance, heartbeats_only),) = fold_instances(plan, dict(held), exact=held)
    assert not heartbeats_only and instance is not None
    assert instance.status == "degraded"
    assert plan.health == [changed]
