"""Model-based test of the projections on the real servers: the views equal the pure fold.

An in-memory event log (two partitions, keyed like Kafka) is the model. Hypothesis
appends random events to it (including heartbeats and deregistrations of instances
nobody registered, and the same event appended twice), delivers random batches to the
REAL PostgreSQL and Redis projections (re-deliveries of what they already applied,
records repeated inside a batch) and kills ``apply`` mid-batch by cancelling it after a
random number of event-loop iterations. After every step, each view's ``snapshot()``
must be exactly the rendering of the fold of the records its checkpoint covers.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from events.log import LogRecord, Positions, advance, covers, unseen
from events.model import (
    Event,
    FlappingEnded,
    FlappingStarted,
    HeartbeatReceived,
    InputRejected,
    InstanceExpired,
    InstanceHealthChanged,
    ServiceDeregistered,
    ServiceRegistered,
    partition_key,
)
from projections.canonical import differences
from projections.fold import fold_view
from projections.port import ViewLost
from projections.postgres import WRITTEN_TABLES, PostgresRegistryProjection
from projections.postgres_render import expected_pg
from projections.redis import RedisRegistryProjection
from projections.redis_render import canonical_redis, expected_redis
from tests.integration.conftest import eventually
from tests.strategies import ALERTS, EVENTS, HEARTBEAT

PARTITIONS = 2
KILL_WITHIN = {"pg": 1000, "redis": 100}  # event-loop turns
RESET_PG = f"TRUNCATE {', '.join(WRITTEN_TABLES)}; DELETE FROM projection_checkpoints"


def partition_of(event: Event) -> int:
    """The partition of an event: a stable hash of its key, as a keyed Kafka producer."""
    return zlib.crc32(partition_key(event).encode()) % PARTITIONS


def expected_lines(kind: str, records: Sequence[LogRecord]) -> dict[str, str]:
    """The canonical rendering of the fold of ``records`` (in log order) in one view."""
    view = fold_view(r.event for r in records)
    if kind == "pg":
        return expected_pg(view)
    return {k: canonical_redis(k, v) for k, v in expected_redis(view).items()}


# --- the state machine -----------------------------------------------------------------


class ProjectionMachine(RuleBasedStateMachine):
    """The log is the model; both projections must always show the fold of what they cover.

    The machine owns an event loop (hypothesis rules are synchronous); the servers are
    given as class attributes by the test (``pg_dsn``, ``redis_host``, ``redis_port``).
    """

    pg_dsn = ""
    redis_host = ""
    redis_port = 0

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.log: list[LogRecord] = []
        self.next_position = dict.fromkeys(range(PARTITIONS), 0)
        self.pending: list[tuple[str, list[LogRecord]]] = []  # killed batches, to redeliver
        self.checkpoints: dict[str, Positions] = {"pg": {}, "redis": {}}  # last seen
        self.must_cover: dict[str, Positions] = {"pg": {}, "redis": {}}  # completed applies
        self.run(self._connect())

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    async def _connect(self) -> None:
        self.pool = await asyncpg.create_pool(self.pg_dsn, min_size=1, max_size=2)
        self.redis = aioredis.Redis(host=self.redis_host, port=self.redis_port,
                                    decode_responses=True)  # fmt: skip
        self.views = {
            "pg": PostgresRegistryProjection(self.pool),
            "redis": RedisRegistryProjection(self.redis),
        }
        await self.views["pg"].setup()
        await self.views["redis"].setup()
        await self.pool.execute(RESET_PG)
        await self.redis.flushdb()

    def teardown(self) -> None:
        try:
            self.run(self.pool.close())
            self.run(self.redis.aclose())
        finally:
            self.loop.close()

    # --- helpers ---------------------------------------------------------------------

    def _targets(self, which: str) -> list[str]:
        return ["pg", "redis"] if which == "both" else [which]

    def _batch(self, data: st.DataObject, kind: str) -> list[LogRecord]:
        """Per partition a contiguous slice that starts at or before the view's checkpoint
        (so it may re-deliver applied records, never skips any), some records repeated
        in place, possibly followed by a re-delivery of part of it (a reader that went
        back), the partitions interleaved at random."""
        checkpoint = self.checkpoints[kind]
        # What is drawn depends on the log only, never on the servers (hypothesis replays
        # draws while shrinking); the view's checkpoint only clamps the drawn values.
        rank = data.draw(st.permutations(range(len(self.log))), label="interleaving")
        lanes: list[list[tuple[int, LogRecord]]] = []
        for p in range(PARTITIONS):
            records = [(rank[i], r) for i, r in enumerate(self.log) if r.partition == p]
            include = data.draw(st.booleans(), label=f"include partition {p}")
            start = data.draw(st.integers(0, len(records)), label="start")
            new = data.draw(st.integers(0, len(records)), label="new records")
            repeat = data.draw(st.sets(st.integers(0, max(len(records) - 1, 0)), max_size=2),
                               label="repeated in place")  # fmt: skip
            back = data.draw(st.integers(0, len(records)), label="then again from")
            more = data.draw(st.integers(0, len(records)), label="and that many more")
            if include:
                start = min(start, checkpoint.get(p, 0))
                end = min(checkpoint.get(p, 0) + new, len(records))
                again = range(min(back, end), min(end + more, len(records)))  # never a gap
                lane = [records[i] for i in range(start, end) for _ in range(1 + (i in repeat))]
                lane += [records[i] for i in again]
                lanes.append(lane)
        batch = []  # merged by rank of the lane heads: each lane keeps its order
        while any(lanes):
            lane = min((lane for lane in lanes if lane), key=lambda lane: lane[0][0])
            batch.append(lane.pop(0)[1])
        return batch

    def _completed(self, kind: str, batch: list[LogRecord], returned: Positions) -> None:
        """A completed apply covers every record of its batch and says so."""
        needed = advance({}, batch)
        assert covers(returned, needed), (kind, returned, needed)
        for p, n in needed.items():
            self.must_cover[kind][p] = max(self.must_cover[kind].get(p, 0), n)

    # --- rules ---------------------------------------------------------------------------

    @rule(events=st.lists(EVENTS, min_size=1, max_size=5))
    def append(self, events: list[Event]) -> None:
        """New events are recorded (ids as ingest derives them: ``ingress-<seq>``)."""
        self._record(events)

    @rule(events=st.lists(ALERTS, min_size=1, max_size=5))
    def append_alerts(self, events: list[Event]) -> None:
        """Alert events only (episodes, silences, notifications of a few alerts), so that
        those of one alert meet more often than among all the others."""
        self._record(events)

    def _record(self, events: list[Event]) -> None:
        for e in events:
            seq = len(self.log) + 1
            self._append(msgspec.structs.replace(e, event_id=f"ingress-{seq}", ingress_seq=seq))

    @precondition(lambda self: self.log)
    @rule(data=st.data())
    def append_again(self, data: st.DataObject) -> None:
        """The same registration/heartbeat/deregistration is recorded a second time (an
        at-least-once append past the log's de-duplication). Not a rejection: the fold
        keeps rejections by event id (one), the Redis view counts records (two)."""
        candidates = [r.event for r in self.log if not isinstance(r.event, InputRejected)]
        if candidates:
            self._append(data.draw(st.sampled_from(candidates), label="again"))

    @precondition(lambda self: any(isinstance(r.event, ServiceRegistered) for r in self.log))
    @rule(data=st.data())
    def heartbeats(self, data: st.DataObject) -> None:
        """Heartbeats of registered instances, the bulk of real traffic: a batch of only
        these takes the projections' shortcut (cached instance, heartbeat fields only)."""
        registered = [r.event for r in self.log if isinstance(r.event, ServiceRegistered)]
        for reg in data.draw(st.lists(st.sampled_from(registered), min_size=1, max_size=4),
                             label="heartbeats of"):  # fmt: skip
            hb = data.draw(HEARTBEAT, label="heartbeat")
            seq = len(self.log) + 1
            self._append(msgspec.structs.replace(
                hb, tenant=reg.tenant, service_name=reg.service_name,
                instance_id=reg.instance_id, event_id=f"ingress-{seq}", ingress_seq=seq,
            ))  # fmt: skip

    def _append(self, event: Event) -> None:
        p = partition_of(event)
        self.log.append(LogRecord(p, self.next_position[p], event))
        self.next_position[p] += 1

    @precondition(lambda self: self.log)
    @rule(data=st.data(), which=st.sampled_from(["pg", "redis", "both"]))
    def deliver(self, data: st.DataObject, which: str) -> None:
        """A batch is applied to completion."""
        for kind in self._targets(which):
            batch = self._batch(data, kind)
            self._completed(kind, batch, self.run(self.views[kind].apply(batch)))

    @precondition(lambda self: self.log)
    @rule(data=st.data(), kind=st.sampled_from(["pg", "redis"]))
    def kill_mid_batch(self, data: st.DataObject, kind: str) -> None:
        """``apply`` is cancelled after a random number of turns of the event loop: the
        view then holds either none or all of the batch, never part of it."""
        batch = self._batch(data, kind)
        # A whole apply takes a few hundred turns (PostgreSQL) or dozens (Redis).
        iterations = data.draw(st.integers(0, KILL_WITHIN[kind]), label="turns before kill")
        before = self.checkpoints[kind]
        after = advance(before, unseen(batch, before))

        async def kill() -> Positions | None:
            task = asyncio.ensure_future(self.views[kind].apply(batch))
            for _ in range(iterations):
                await asyncio.sleep(0)
            task.cancel()
            try:
                return await task
            except asyncio.CancelledError:
                return None

        returned = self.run(kill())
        if returned is not None:  # it finished before the kill
            self._completed(kind, batch, returned)
        self.pending.append((kind, batch))  # either way (the rules must not depend on timing)
        checkpoint, _ = self.run(self.views[kind].snapshot())
        # Killed before its commit, or after it (the reply lost): all or nothing.
        assert checkpoint in (before, after), (kind, before, after, checkpoint)

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def redeliver_killed(self, data: st.DataObject) -> None:
        """A batch whose apply was killed is delivered again, and completes."""
        kind, batch = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))
        self._completed(kind, batch, self.run(self.views[kind].apply(batch)))

    # --- the invariant ---------------------------------------------------------------------

    @invariant()
    def views_equal_the_fold_of_what_they_cover(self) -> None:
        """Each view is the fold of exactly the records its checkpoint covers; checkpoints
        only move forward and cover every completed apply."""
        for kind, view in self.views.items():
            checkpoint, lines = self.run(view.snapshot())
            assert covers(checkpoint, self.checkpoints[kind]), (kind, checkpoint)
            assert covers(checkpoint, self.must_cover[kind]), (kind, checkpoint)
            assert all(0 <= n <= self.next_position[p] for p, n in checkpoint.items())
            covered = [r for r in self.log if r.position < checkpoint.get(r.partition, 0)]
            problems = differences(expected_lines(kind, covered), lines)
            assert not problems, f"{kind} view at {checkpoint}:\n" + "\n".join(problems[:10])
            self.checkpoints[kind] = checkpoint


def test_views_equal_the_fold_under_redelivery_duplicates_and_kills(
    postgres_server, pg_database, redis_server
):
    """Random event sequences (unknown instances, repeated events) delivered in random
    batches (re-deliveries, in-batch repeats, apply killed mid-batch and redelivered) to
    the real PostgreSQL and Redis projections: after every step each view equals the
    pure fold of exactly the records its checkpoint covers, and every completed apply is
    covered."""
    ProjectionMachine.pg_dsn = postgres_server.dsn(pg_database)
    ProjectionMachine.redis_host = redis_server.host
    ProjectionMachine.redis_port = redis_server.port
    run_state_machine_as_test(
        ProjectionMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            # Kills are timed by event-loop turns around real I/O, so a failing case does
            # not replay exactly; shrinking would spend minutes (up to the test timeout)
            # on flaky replays. The failing steps are reported as found (at most 30).
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
            report_multiple_bugs=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )


# --- a readable example of a kill mid-batch ---------------------------------------------


def _record(partition_positions: dict[int, int], event: Event) -> LogRecord:
    p = partition_of(event)
    position = partition_positions.get(p, 0)
    partition_positions[p] = position + 1
    return LogRecord(p, position, event)


@pytest.fixture
async def views(postgres_server, pg_database, redis_server):
    """Both projections on this test's fresh database and Valkey, migrated."""
    pool = await asyncpg.create_pool(postgres_server.dsn(pg_database), min_size=1, max_size=3)
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    pg, rds = PostgresRegistryProjection(pool), RedisRegistryProjection(client)
    await pg.setup()
    yield pg, rds, pool, client
    await client.aclose()
    await pool.close()


def _event(kind: type[Event], seq: int, **fields) -> Event:
    base = {"event_id": f"ingress-{seq}", "tenant": "default", "ingress_seq": seq,
            "ts": (1_750_000_000_000_000 + seq * 250_000) / 1_000_000}  # fmt: skip
    return kind(**{**base, **fields})


def _log(*events: Event) -> list[LogRecord]:
    positions: dict[int, int] = {}
    return [_record(positions, e) for e in events]


async def _wait_until(check, what: str) -> None:
    """Poll ``check`` until it holds (a generous deadline: a hang guard, not a speed target)."""
    try:
        await eventually(check, timeout=30.0, interval=0.01)
    except AssertionError:
        raise AssertionError(f"never happened: {what}") from None


async def _kill(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_apply_killed_mid_batch_changes_nothing_and_its_redelivery_applies_all(views):
    """Both views: an apply killed in the middle of its batch (PostgreSQL: rows already
    upserted, blocked on a later insert; Redis: its batch script held by CLIENT PAUSE)
    leaves checkpoint and content exactly as before the batch; delivering the same batch
    again then applies all of it (the view equals the fold of both batches)."""
    pg, rds, pool, client = views
    reg = {"service_name": "orders", "host": "10.0.0.5", "port": 8080}
    log = _log(
        _event(ServiceRegistered, 1, instance_id="i-1", **reg, metadata={"zone": "a"}),
        _event(ServiceRegistered, 2, instance_id="i-2", **reg),
        # The batch that will be killed:
        _event(HeartbeatReceived, 3, service_name="orders", instance_id="i-1",
               status="degraded", load=0.75),
        _event(ServiceDeregistered, 4, service_name="orders", instance_id="i-2"),
        _event(ServiceRegistered, 5, instance_id="i_3", **reg),
        _event(HeartbeatReceived, 6, service_name="orders", instance_id="nobody"),
        _event(InputRejected, 7, subject="hub.register", reason_code="INVALID_FIELD",
               reason="port: expected int", excerpt='{"port": "x"}'),
    )  # fmt: skip
    first, second = log[:2], log[2:]

    for kind, view in (("pg", pg), ("redis", rds)):
        await view.apply(first)
        before = await view.snapshot()
        assert before[1] == expected_lines(kind, first)

        if kind == "pg":
            # Hold the rejection's primary key in an open transaction: the apply upserts
            # its registry rows, then waits on that insert, inside its transaction.
            blocker = await pool.acquire()
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute(
                "INSERT INTO input_rejections VALUES ($1, 'x', 0, 's', 'c', 'r', '', now())",
                "ingress-7",
            )
            task = asyncio.ensure_future(view.apply(second))
            await _wait_until(
                lambda: pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE 'INSERT INTO input_rejections%'"
                ),
                "the apply waits on its rejection insert",
            )
            await _kill(task)
            await tx.rollback()
            await pool.release(blocker)
        else:
            # Pause writes: the apply has read and planned, and its batch script (one
            # atomic write of effects and checkpoint) is held before it runs.
            await client.execute_command("CLIENT", "PAUSE", "30000", "WRITE")
            task = asyncio.ensure_future(view.apply(second))

            async def held() -> bool:
                return any(
                    "b" in c["flags"] and c["cmd"] in ("evalsha", "eval")
                    for c in await client.client_list()
                )

            await _wait_until(held, "the apply's batch script is held")
            await _kill(task)
            await client.execute_command("CLIENT", "UNPAUSE")

        assert await view.snapshot() == before, f"{kind}: the killed batch left traces"

        applied = await view.apply(second)  # the redelivery
        assert covers(applied, advance({}, log))
        checkpoint, lines = await view.snapshot()
        assert checkpoint == applied
        assert not differences(expected_lines(kind, log), lines)
        assert await view.apply(second) == applied  # and once more: nothing changes
        assert await view.snapshot() == (checkpoint, lines)


# --- edge cases the state machine found, as plain examples ------------------------------


async def test_pg_metadata_numbers_jsonb_rewrites_still_equal_the_fold(views):
    """PostgreSQL: metadata numbers the wire accepts but jsonb rewrites (1e16 comes back
    as 10000000000000000, -6.197572189500859e16 as -61975721895008590 - the digits of
    the JSON, not of the binary float - and -0.0 as 0) still make a view equal to the
    fold, and rebuild() (which checks its shadow tables against the fold) accepts them."""
    pg, _, _, _ = views
    metadata = {
        "big": 1e16,
        "odd": -6.197572189500859e16,
        "huge": 1.5e300,
        "zero": -0.0,
        "tiny": 5e-324,
        "int": 2**70,
    }
    log = _log(_event(ServiceRegistered, 1, service_name="orders", instance_id="i-1",
                      host="h", port=1, metadata=metadata))  # fmt: skip
    await pg.apply(log)
    checkpoint, lines = await pg.snapshot()
    assert not differences(expected_lines("pg", log), lines)
    await pg.rebuild(fold_view(r.event for r in log), checkpoint)
    assert await pg.snapshot() == (checkpoint, lines)


@pytest.mark.parametrize("kind", ["pg", "redis"])
async def test_a_record_repeated_inside_a_batch_is_applied_once(views, kind):
    """Both views: a batch [rejected@0, rejected@0, registered@1, deregistered@2,
    registered@1] (one partition) applies each record once, in log order: the rejection
    is counted once, and the registration re-delivered after the deregistration does not
    resurrect the instance."""
    pg, rds, _, _ = views
    view = pg if kind == "pg" else rds
    rejected, register, deregister = _log(
        _event(InputRejected, 1, tenant="acme", subject="hub.register",
               reason_code="INVALID_FIELD", reason="r"),
        _event(ServiceRegistered, 2, service_name="orders", instance_id="i-1", host="h",
               port=1),
        _event(ServiceDeregistered, 3, service_name="orders", instance_id="i-1"),
    )  # fmt: skip
    assert rejected.partition == register.partition == deregister.partition
    await view.apply([rejected, rejected, register, deregister, register])
    _, lines = await view.snapshot()
    assert not differences(expected_lines(kind, [rejected, register, deregister]), lines)


async def test_pg_verify_tells_a_number_from_a_string_in_metadata(views):
    """PostgreSQL: a metadata value whose JSON type changed in the view (string "1" in the
    log, number 1 in the row) is a difference: the canonical rendering, while it lets
    jsonb's rewriting of numbers pass, keeps numbers and strings apart."""
    pg, _, pool, _ = views
    log = _log(_event(ServiceRegistered, 1, service_name="orders", instance_id="i-1",
                      host="h", port=1, metadata={"replicas": "1", "ratio": 1.5}))  # fmt: skip
    await pg.apply(log)
    _, lines = await pg.snapshot()
    assert not differences(expected_lines("pg", log), lines)
    for changed in ('{"replicas": 1, "ratio": 1.5}', '{"replicas": "1", "ratio": "1.5"}'):
        await pool.execute("UPDATE service_registry SET metadata = $1::jsonb", changed)
        _, lines = await pg.snapshot()
        assert differences(expected_lines("pg", log), lines), changed


@pytest.mark.parametrize("cache", [50_000, 0])
async def test_the_index_and_counts_follow_entries_exits_and_status_changes(redis_server, cache):
    """Redis, with and without its cache: each batch of a scripted history (instances
    registered, heartbeating, changing health, flapping and back, deregistered, expired,
    registered again) leaves the tenant's index (``hub:<t>:index``) and the per-service
    counts (``hub:<t>:counts:<service>``) exactly as the fold renders them: an instance
    that leaves is removed from the index, a count that comes to 0 disappears."""
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    await client.flushdb()
    view = RedisRegistryProjection(client, cache=cache)
    reg = {"host": "h", "port": 1}
    orders, pay = {"service_name": "orders"}, {"service_name": "pay.v2"}
    batches = [
        [_event(ServiceRegistered, 1, **orders, instance_id="i-1", **reg),
         _event(ServiceRegistered, 2, **orders, instance_id="i-2", **reg)],
        [_event(ServiceRegistered, 3, **pay, instance_id="i-1", **reg),
         _event(HeartbeatReceived, 4, **orders, instance_id="i-1", status="degraded")],
        [_event(InstanceHealthChanged, 5, **orders, instance_id="i-2", previous="healthy",
                status="unhealthy", reason="r")],
        [_event(FlappingStarted, 6, **orders, instance_id="i-1", changes=5, window_s=30.0,
                status="degraded")],
        [_event(FlappingEnded, 7, **orders, instance_id="i-1", previous="degraded",
                status="healthy", quiet_s=10.0)],
        [_event(ServiceDeregistered, 8, **orders, instance_id="i-2")],
        [_event(InstanceHealthChanged, 9, **pay, instance_id="i-1", previous="healthy",
                status="critical", reason="no heartbeat"),
         _event(InstanceExpired, 10, **pay, instance_id="i-1", last_seen=1.0,
                critical_since=2.0)],
        [_event(ServiceRegistered, 11, **orders, instance_id="i-2", **reg),
         _event(ServiceDeregistered, 12, **orders, instance_id="i-1")],
    ]  # fmt: skip
    log = _log(*[e for batch in batches for e in batch])
    done = 0
    try:
        for batch in batches:
            await view.apply(log[done : done + len(batch)])
            done += len(batch)
            _, lines = await view.snapshot()
            assert not differences(expected_lines("redis", log[:done]), lines), done
        assert await client.zrange("hub:default:index", 0, -1) == ["orders i-2"]
        assert await client.hgetall("hub:default:counts:orders") == {
            "status:healthy": "1", "trusted": "1"}  # fmt: skip
        assert not await client.exists("hub:default:counts:pay.v2")
    finally:
        await client.aclose()


@pytest.mark.parametrize("kind", ["pg", "redis"])
async def test_a_batch_is_not_applied_over_a_lost_view(views, kind):
    """Both views: a projection applies a batch; its view is then emptied (Redis:
    FLUSHALL; PostgreSQL: every table truncated) or replaced by an older rebuild (what
    ``hub replay`` does, through another projection object). Its next batch raises
    ViewLost and writes nothing, where it used to apply the records in hand over the
    hole and carry on; ``examine`` says the same; ``rebuild`` makes it whole again."""
    pg, rds, pool, client = views
    view = pg if kind == "pg" else rds
    reg = {"service_name": "orders", "host": "h", "port": 1}
    log = _log(*[_event(ServiceRegistered, n, instance_id=f"i-{n}", **reg) for n in range(1, 7)])
    await view.apply(log[:4])

    async def wipe() -> None:
        if kind == "pg":
            await pool.execute(RESET_PG)
        else:
            await client.flushdb()

    async def older() -> None:
        other = (PostgresRegistryProjection(pool) if kind == "pg"
                 else RedisRegistryProjection(client))  # fmt: skip
        await other.rebuild(fold_view(r.event for r in log[:2]), advance({}, log[:2]))

    for lose in (wipe, older):
        await lose()
        before = await view.snapshot()
        with pytest.raises(ViewLost):
            await view.apply(log[4:])
        with pytest.raises(ViewLost):
            await view.examine()
        assert await view.snapshot() == before, lose.__name__  # nothing written
        await view.rebuild(fold_view(r.event for r in log[:4]), advance({}, log[:4]))
        assert covers(await view.apply(log[4:]), advance({}, log))
        _, lines = await view.snapshot()
        assert not differences(expected_lines(kind, log), lines)
        await view.rebuild(fold_view(r.event for r in log[:4]), advance({}, log[:4]))
