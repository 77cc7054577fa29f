"""The contract of the ``Projection`` port, written once and run against every view.

In the manner of the eventsourcing library's abstract test cases (and of
``test_event_log_contract.py``): each test pins one promise of
``projections.port.Projection`` and runs on each adapter through the ``harness``
fixture: PostgreSQL (a fresh database on the session's server) and Redis (a fresh
Valkey). What a test compares is what ``hub verify`` compares: the view's
``snapshot()`` with its ``rendering.expected`` of the pure fold. Where the views
legitimately differ (only the Redis view has readers told its state), the harness
says so and the test states what the port promises.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Protocol

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from events.log import LogRecord, Positions, advance, unseen
from events.model import Event
from projections.canonical import component_subject, instance_subject
from projections.fold import fold_view
from projections.port import READY, REBUILDING, Projection, ViewLost
from projections.postgres import WRITTEN_TABLES, PostgresRegistryProjection
from projections.redis import RedisRegistryProjection
from projections.redis_read import read_view_state
from tests.integration.conftest import (
    ALERT_T0,
    alert_firing,
    alert_inhibited,
    alert_pending,
    alert_resolved,
    alert_rules_loaded,
    alert_uninhibited,
    deregistered,
    health_changed,
    heartbeat,
    infra_checked,
    infra_loaded,
    infra_status_changed,
    notification_due,
    notification_failed,
    notification_sent,
    registered,
    rejected,
    silence_created,
    silence_expired,
)

# Every table the PostgreSQL view writes, and its checkpoints.
WIPE_PG = f"TRUNCATE {', '.join(WRITTEN_TABLES)}; DELETE FROM projection_checkpoints"


# --- one harness per adapter -------------------------------------------------------------


class Harness(Protocol):
    """What the suite needs from an adapter besides the port itself."""

    # Whether the view has readers that ``mark`` tells its state (queries read Redis).
    has_readers: bool

    def open(self) -> Projection:
        """A new projection object on this test's view: another projector, or the one
        ``hub replay`` uses."""
        ...

    async def wipe(self) -> None:
        """Empty the view behind its projections' backs (checkpoint included)."""
        ...

    async def told(self, projection: Projection) -> str | None:
        """What the view's readers are told of it now (READY, REBUILDING, or why they
        cannot read it); None for a view without readers."""
        ...

    async def close(self) -> None: ...


class PostgresHarness:
    has_readers = False

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def open(self) -> Projection:
        return PostgresRegistryProjection(self.pool)

    async def wipe(self) -> None:
        await self.pool.execute(WIPE_PG)

    async def told(self, projection: Projection) -> str | None:
        return None

    async def close(self) -> None:
        await self.pool.close()


class RedisHarness:
    has_readers = True

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    def open(self) -> Projection:
        return RedisRegistryProjection(self.client)

    async def wipe(self) -> None:
        await self.client.flushdb()

    async def told(self, projection: Projection) -> str | None:
        """As the query responders read it (``read_view_state``: None means readable)."""
        found = await read_view_state(self.client, projection.name)
        return READY if found is None else found[0]

    async def close(self) -> None:
        await self.client.aclose()


@pytest.fixture(params=["postgres", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """The adapter under test, on a view of this test's own."""
    made: PostgresHarness | RedisHarness
    if request.param == "postgres":
        server = request.getfixturevalue("postgres_server")
        dsn = server.dsn(request.getfixturevalue("pg_database"))
        made = PostgresHarness(await asyncpg.create_pool(dsn, min_size=1, max_size=4))
    else:
        server = request.getfixturevalue("redis_server")
        made = RedisHarness(aioredis.Redis(host=server.host, port=server.port,
                                           decode_responses=True))  # fmt: skip
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def view(harness: Harness) -> Projection:
    """A projection on a new, empty view, set up."""
    projection = harness.open()
    await projection.setup()
    return projection


# --- helpers -------------------------------------------------------------------------------


def on(
    partition: int, events: Iterable[Event], *, start: int = 0, step: int = 1
) -> list[LogRecord]:
    """``events`` as records of ``partition`` from position ``start`` (``step`` > 1: with
    gaps between positions, as Kafka's transaction markers leave)."""
    return [LogRecord(partition, start + n * step, e) for n, e in enumerate(events)]


def interleaved(*lanes: list[LogRecord]) -> list[LogRecord]:
    """The lanes merged one record from each in turn (each lane keeps its order)."""
    out: list[LogRecord] = []
    for i in range(max(map(len, lanes))):
        out += [lane[i] for lane in lanes if i < len(lane)]
    return out


def mixed_log() -> list[LogRecord]:
    """Every kind of record the views show, instances, infrastructure and alerts on three
    partitions: registrations in two tenants, heartbeats, a health change, a
    deregistration, rejected input, a configuration load, check results and a status
    change; alert rules, an alert pending, firing, resolved and active again, another
    inhibited and uninhibited, a silence created and expired, a notification due, failed
    once and sent."""
    instances = on(0, [
        *[registered(n) for n in range(6)], registered(1, tenant="acme"),
        *[heartbeat(n, 1) for n in range(6)], health_changed(3, "degraded"), deregistered(2),
        rejected(1), rejected(2, tenant="acme"), heartbeat(4, 2),
    ])  # fmt: skip
    infra = on(1, [
        infra_loaded("pg", "kafka"), infra_checked("pg", 1), infra_status_changed("pg", "HEALTHY"),
        infra_checked("kafka", 1), infra_checked("pg", 2),
    ])  # fmt: skip
    since = ALERT_T0 + 1
    alerts = on(2, [
        alert_rules_loaded("d1"), alert_pending("f1", 1),
        silence_created("s1", 2, matchers=[{"name": "service", "op": "=", "value": "svc-1"}],
                        starts_at=ALERT_T0, ends_at=ALERT_T0 + 3600),
        alert_firing("f1", 5, since=since), notification_due("n1", 6, firing=["f1"]),
        alert_firing("f2", 6, service="svc-1"), alert_inhibited("f2", 7, by="f1"),
        notification_failed("n1", 8, attempt=1, next_attempt_at=ALERT_T0 + 10),
        alert_uninhibited("f2", 9, by="f1"), notification_sent("n1", 11, attempt=2),
        alert_resolved("f1", 12, since=since), silence_expired("s1", 13), alert_pending("f1", 20),
    ])  # fmt: skip
    return interleaved(instances, infra, alerts)


def expected(view: Projection, records: Sequence[LogRecord]) -> dict[str, str]:
    """What ``view``'s snapshot must hold after exactly ``records`` (in log order)."""
    return view.rendering.expected(fold_view(r.event for r in records))


def covered(records: Sequence[LogRecord], checkpoint: Positions) -> list[LogRecord]:
    """The records of ``records`` a view at ``checkpoint`` holds (each once, in order)."""
    return unseen([r for r in records if r.position < checkpoint.get(r.partition, 0)], {})


async def holds(view: Projection, records: Sequence[LogRecord]) -> None:
    """The view's checkpoint covers exactly ``records`` and it holds their fold."""
    checkpoint, lines = await view.snapshot()
    assert checkpoint == advance({}, records)
    assert lines == expected(view, records)


# --- the contract --------------------------------------------------------------------------


async def test_setup_is_idempotent(harness: Harness, view: Projection) -> None:
    """``setup`` may run any number of times, on an empty view or on one that holds
    records (every projector sets up at start): it changes nothing the view holds."""
    await view.setup()
    log = mixed_log()
    await view.apply(log)
    before = await view.snapshot()
    again = harness.open()
    await again.setup()
    await again.setup()
    assert await view.snapshot() == before
    assert await again.apply(log) == before[0]


async def test_apply_returns_the_new_checkpoint_and_the_view_holds_its_fold(
    view: Projection,
) -> None:
    """Each ``apply`` returns the checkpoint after its records, ``checkpoint()`` says
    the same, and the view holds the fold of everything applied so far."""
    log = mixed_log()
    applied: list[LogRecord] = []
    for batch in (log[:5], log[5:6], log[6:17], log[17:]):
        returned = await view.apply(batch)
        applied += batch
        assert returned == advance({}, applied)
        assert await view.checkpoint() == returned
        await holds(view, applied)


async def test_the_checkpoint_is_written_atomically_with_the_effect(view: Projection) -> None:
    """An ``apply`` cancelled after any number of turns of the event loop (before it
    writes, while it reads or writes, after it wrote) leaves the view at its checkpoint
    before the batch or after it, and always holding exactly the fold of what its
    checkpoint covers: never the effect without the checkpoint, nor the checkpoint
    without it. (Swept until the apply is done before the cancel; a view the batch
    reached is rebuilt to before it for the next cut.)"""
    log = mixed_log()
    first, second = log[:8], log[8:]
    await view.apply(first)
    before, after = advance({}, first), advance({}, log)
    turns = 0
    while True:
        task = asyncio.ensure_future(view.apply(second))
        for _ in range(turns):
            await asyncio.sleep(0)
        finished = task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        checkpoint, lines = await view.snapshot()
        assert checkpoint in (before, after), (turns, checkpoint)
        assert lines == expected(view, covered(log, checkpoint)), turns
        if finished:
            break
        if checkpoint == after:
            await view.rebuild(fold_view(r.event for r in first), before)
        turns += 1 + turns // 8
        assert turns < 100_000, "the apply never completed"


async def test_reapplying_covered_records_changes_nothing(view: Projection) -> None:
    """Records the checkpoint covers are skipped: a batch delivered again (whole, in
    part, or within itself twice) returns the same checkpoint and changes nothing, not
    even the counters of rejected input."""
    log = mixed_log()
    checkpoint = await view.apply(log)
    before = await view.snapshot()
    for again in (log, log[:7], log[3:9] + log[3:9], []):
        assert await view.apply(again) == checkpoint
        assert await view.snapshot() == before


async def test_a_batch_spanning_covered_and_new_records_applies_only_the_new(
    view: Projection,
) -> None:
    """A batch mixing records the checkpoint covers with new ones (a reader that went back
    on one partition) applies only the new ones: a covered registration delivered after a
    new deregistration of the same instance does not bring it back, a covered rejection
    is not counted again."""
    first = on(0, [registered(1), rejected(1)])
    await view.apply(first)
    new_registration = on(0, [registered(2)], start=2)
    new_deregistration = on(1, [deregistered(1)])
    batch = [*new_deregistration, *first, *new_registration]
    assert await view.apply(batch) == {0: 3, 1: 1}
    await holds(view, [*first, *new_deregistration, *new_registration])


async def test_the_checkpoint_is_kept_per_partition(view: Projection) -> None:
    """Each partition has its own position: records are new or covered by their own
    partition's (a record at position 3 of one partition is new though another is at 10),
    positions may leave gaps, and a batch moves only the partitions it holds."""
    p0 = on(0, [registered(n) for n in range(4)], step=3)  # positions 0, 3, 6, 9
    p1 = on(1, [registered(n, tenant="acme") for n in range(2)])
    assert await view.apply(p0 + p1) == {0: 10, 1: 2}
    p2 = on(2, [infra_loaded("pg"), infra_checked("pg", 1)], start=3)
    assert await view.apply(p2) == {0: 10, 1: 2, 2: 5}
    p1_more = on(1, [rejected(1, tenant="acme")], start=2)
    assert await view.apply([*p1, *p1_more]) == {0: 10, 1: 3, 2: 5}
    assert await view.checkpoint() == {0: 10, 1: 3, 2: 5}
    checkpoint, lines = await view.snapshot()
    assert checkpoint == {0: 10, 1: 3, 2: 5}
    assert lines == expected(view, [*p0, *p1, *p2, *p1_more])


async def test_attach_returns_the_checkpoint(harness: Harness, view: Projection) -> None:
    """``attach`` returns the view's checkpoint (none on a new view); a projection that
    attaches to a view others applied to goes on from there."""
    assert await view.attach() == {}
    log = mixed_log()
    checkpoint = await view.apply(log[:10])
    assert await view.attach() == checkpoint
    other = harness.open()
    assert await other.attach() == checkpoint
    assert await other.apply(log) == advance({}, log)
    await holds(other, log)


@pytest.mark.parametrize("loss", ["emptied", "replaced by an older rebuild"])
async def test_a_lost_view_raises_view_lost_and_nothing_is_written(
    harness: Harness, view: Projection, loss: str
) -> None:
    """Once its view was emptied (a flush, a truncate) or its checkpoint put behind what
    the projection applied (``hub replay`` swapping in an older view through another
    projection), ``apply`` raises ViewLost and writes nothing, ``examine`` and ``attach``
    raise it too; ``rebuild`` makes the view whole again, and applying goes on."""
    log = mixed_log()
    await view.apply(log[:12])
    if loss == "emptied":
        await harness.wipe()
    else:
        await harness.open().rebuild(fold_view(r.event for r in log[:4]), advance({}, log[:4]))
    before = await view.snapshot()
    with pytest.raises(ViewLost):
        await view.apply(log[12:])
    assert await view.snapshot() == before
    with pytest.raises(ViewLost):
        await view.examine()
    with pytest.raises(ViewLost):
        await view.attach()
    assert await view.snapshot() == before
    await view.rebuild(fold_view(r.event for r in log[:12]), advance({}, log[:12]))
    assert await view.apply(log[12:]) == advance({}, log)
    await holds(view, log)


async def test_examine_passes_a_view_that_holds_what_was_applied(
    harness: Harness, view: Projection
) -> None:
    """``examine`` on an intact view (new, or holding what this projection and another
    applied) raises nothing, returns its notices as strings, and changes nothing."""
    assert all(isinstance(n, str) for n in await view.examine())
    log = mixed_log()
    await view.apply(log[:9])
    other = harness.open()
    await other.attach()
    await other.apply(log)
    before = await view.snapshot()
    for projection in (view, other):
        notices = await projection.examine()
        assert all(isinstance(n, str) for n in notices)
    assert await view.snapshot() == before


async def test_mark_tells_the_views_readers_its_state(harness: Harness, view: Projection) -> None:
    """``mark`` tells the view's readers (where it has some) REBUILDING or READY; it is
    not part of the view: its snapshot does not change."""
    await view.apply(mixed_log())
    before = await view.snapshot()
    await view.mark(REBUILDING, "rebuilding for the test")
    assert await harness.told(view) == (REBUILDING if harness.has_readers else None)
    await view.mark(READY)
    assert await harness.told(view) == (READY if harness.has_readers else None)
    assert await view.snapshot() == before


async def test_rebuild_replaces_the_view_with_a_fold_and_its_checkpoint(
    harness: Harness, view: Projection
) -> None:
    """``rebuild`` replaces everything the view held by the given fold, with the given
    checkpoint (nothing of the old content left), READY for its readers; applying then
    goes on from that checkpoint."""
    await view.apply(on(0, [*[registered(n) for n in range(10, 15)], rejected(9)]))
    await view.mark(REBUILDING, "about to be rebuilt")
    log = mixed_log()
    positions = advance({}, log[:14])
    await view.rebuild(fold_view(r.event for r in log[:14]), positions)
    assert await view.checkpoint() == positions
    await holds(view, log[:14])
    assert await harness.told(view) == (READY if harness.has_readers else None)
    assert await view.apply(log) == advance({}, log)
    await holds(view, log)


async def test_the_snapshot_is_the_fold_of_the_records_the_checkpoint_covers(
    view: Projection,
) -> None:
    """After each batch of a log with every kind of record (instances and infrastructure
    both), the snapshot is the checkpoint and exactly ``rendering.expected`` of the fold
    of the records it covers: what ``hub verify`` compares."""
    log = mixed_log()
    for end in (1, 2, 9, 10, 20, len(log)):
        await view.apply(log[:end])
        await holds(view, log[:end])


async def test_a_warmed_projection_applies_as_the_fold(harness: Harness, view: Projection) -> None:
    """A projection that ``warm``s (loads what the view holds) before attaching applies
    heartbeat batches (its shortcut for instances it knows) exactly as the fold."""
    log = mixed_log()
    await view.apply(log)
    other = harness.open()
    await other.warm()
    await other.attach()
    end = advance({}, log)[0]
    more = on(0, [heartbeat(n, 3) for n in range(6)], start=end)
    last = on(0, [heartbeat(1, 4)], start=end + len(more))
    await other.apply(more)
    await other.apply(last)
    await holds(other, [*log, *more, *last])


async def test_the_rendering_tells_volatile_fields_from_differences(view: Projection) -> None:
    """What verify allows on a live hub: when the log has replaced the heartbeat or check
    result a view applied by a newer one, the lines that differ are about that instance
    or component (``volatile_of``) and equal without the volatile fields; any other
    difference stays one."""
    applied = on(0, [infra_loaded("pg"), registered(1), heartbeat(1, 1), infra_checked("pg", 1)])
    await view.apply(applied)
    _, actual = await view.snapshot()
    moved_on = fold_view([infra_loaded("pg"), registered(1), heartbeat(1, 2),
                          infra_checked("pg", 2)])  # fmt: skip
    wanted = view.rendering.expected(moved_on)
    differ = [k for k in wanted.keys() | actual.keys() if wanted.get(k) != actual.get(k)]
    assert differ
    subjects = {instance_subject("default", "svc-1", "i-1"), component_subject("pg")}
    for key in differ:
        assert view.rendering.volatile_of(key) in subjects, key
        assert view.rendering.without_volatile(wanted[key]) == (
            view.rendering.without_volatile(actual[key])
        )
    elsewhere = msgspec.structs.replace(registered(1), host="10.9.9.9")
    moved_host = fold_view([infra_loaded("pg"), elsewhere, heartbeat(1, 1), infra_checked("pg", 1)])
    wanted = view.rendering.expected(moved_host)
    differ = [k for k in wanted if wanted[k] != actual.get(k)]
    assert differ
    for key in differ:
        assert view.rendering.without_volatile(wanted[key]) != (
            view.rendering.without_volatile(actual[key])
        ), key
