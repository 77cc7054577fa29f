"""The contract of the ``EventLog`` port, written once and run against every adapter.

In the manner of the eventsourcing library's abstract test cases: each test pins one
promise of ``hub.eventlog.port.EventLog`` and runs on each adapter, through the
``harness`` fixture: JetStream (a fresh NATS server per test), Kafka (a fresh topic on
the session's broker) and the in-memory log. Where the real logs legitimately differ
(JetStream: one partition, sequences from 1, superseded heartbeats rolled up at once;
Kafka: several partitions, offsets from 0 with gaps for transaction markers, compaction
in the background), a test states what the port promises, not how one log keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

import nats
import nats.js.errors
import pytest
from structlog.testing import capture_logs

from events.log import LogRecord, Positions, advance, covers
from events.model import HeartbeatReceived
from hub.eventlog.jetstream import SUBJECT_PREFIX, JetStreamEventLog
from hub.eventlog.kafka import KafkaEventLog
from hub.eventlog.memory import MemoryEventLog, MemoryLogStore
from hub.eventlog.port import EventLog, EventLogNotFound
from hub.stack import KafkaServer, NatsServer
from tests.integration.conftest import eventually, heartbeat, infra_checked, registered

# A read that must end is given this long before the test calls it a hang (generous: the
# machine is shared; nothing is asserted about how long anything takes).
READ_DEADLINE_S = 120.0
# Kafka only compacts closed segments: the contract's topics roll theirs quickly.
KAFKA_SEGMENT_MS = 100
# What readers must leave out: not JSON, not a whole event, an unknown type, nothing.
NOT_EVENTS = [b"not json", b'{"type": "ServiceRegistered"}', b'{"type": "NoSuchEvent"}', b""]


# --- one harness per adapter -------------------------------------------------------------


class Harness(Protocol):
    """What the suite needs from an adapter besides the port itself."""

    # Whether a superseded heartbeat is gone as soon as the next one is stored (JetStream's
    # roll-up, the memory log), rather than some time later (Kafka's cleaner).
    rolls_up_at_once: bool

    async def open(self, *, read_only: bool = False) -> EventLog:
        """A started handle on this test's log (made by the first writable open)."""
        ...

    def missing(self) -> EventLog:
        """An unstarted read-only handle on a log that does not exist."""
        ...

    async def missing_exists(self) -> bool:
        """Whether the log of ``missing()`` exists now."""
        ...

    async def put_foreign(self, data: bytes) -> None:
        """Put ``data`` in the log as something other than the hub could."""
        ...

    def hold(self, seconds: float) -> None:
        """Stop the server answering for ``seconds`` from now (nothing to hold in memory)."""
        ...


class _Handles:
    """What the harnesses share: the handles to close at the end, holding the server."""

    def __init__(self, server: NatsServer | KafkaServer | None = None) -> None:
        self.opened: list[EventLog] = []
        self.server = server
        self._held: asyncio.TimerHandle | None = None

    def hold(self, seconds: float) -> None:
        if self.server is None or self.server.pid is None:
            return
        os.kill(self.server.pid, signal.SIGSTOP)
        self._held = asyncio.get_running_loop().call_later(seconds, self._let_go)

    def _let_go(self) -> None:
        self._held = None
        if self.server is not None and self.server.pid is not None:
            os.kill(self.server.pid, signal.SIGCONT)

    async def _started(self, log: EventLog) -> EventLog:
        await log.start()
        self.opened.append(log)
        return log

    async def close(self) -> None:
        if self._held is not None:  # never leave a server stopped (Kafka's is shared)
            self._held.cancel()
            self._let_go()
        for log in reversed(self.opened):
            await log.close()


class JetStreamHarness(_Handles):
    rolls_up_at_once = True

    def __init__(self, server: NatsServer, nc: nats.NATS) -> None:
        super().__init__(server)
        self.nc = nc

    async def open(self, *, read_only: bool = False) -> EventLog:
        return await self._started(JetStreamEventLog(self.nc, read_only=read_only))

    def missing(self) -> EventLog:
        return JetStreamEventLog(self.nc, stream="HUB_EVENTS_MISSING", read_only=True)

    async def missing_exists(self) -> bool:
        try:
            await self.nc.jetstream().stream_info("HUB_EVENTS_MISSING")
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def put_foreign(self, data: bytes) -> None:
        await self.nc.jetstream().publish(f"{SUBJECT_PREFIX}.default.ServiceRegistered", data)


class KafkaHarness(_Handles):
    rolls_up_at_once = False

    def __init__(self, server: KafkaServer, topic: str) -> None:
        super().__init__(server)
        self.brokers = [server.bootstrap]
        self.topic = topic

    async def open(self, *, read_only: bool = False) -> EventLog:
        log = KafkaEventLog(self.brokers, self.topic, read_only=read_only,
                            segment_ms=KAFKA_SEGMENT_MS)  # fmt: skip
        return await self._started(log)

    def missing(self) -> EventLog:
        return KafkaEventLog(self.brokers, f"{self.topic}-missing", read_only=True)

    async def missing_exists(self) -> bool:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.brokers)
        await admin.start()
        try:
            return f"{self.topic}-missing" in await admin.list_topics()
        finally:
            await admin.close()

    async def put_foreign(self, data: bytes) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=self.brokers)
        await producer.start()
        try:  # the topic is compacted: a record needs a key
            await producer.send_and_wait(self.topic, data, key=b"foreign", partition=0)
        finally:
            await producer.stop()


class MemoryHarness(_Handles):
    rolls_up_at_once = True

    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryLogStore()

    async def open(self, *, read_only: bool = False) -> EventLog:
        # Several partitions, like Kafka, so positions are really per partition.
        return await self._started(MemoryEventLog(self.store, partitions=3, read_only=read_only))

    def missing(self) -> EventLog:
        return MemoryEventLog(self.store, name="missing", read_only=True)

    async def missing_exists(self) -> bool:
        return "missing" in self.store

    async def put_foreign(self, data: bytes) -> None:
        self.store.put("events", data, partition=0)


@pytest.fixture(params=["jetstream", pytest.param("kafka", marks=pytest.mark.kafka), "memory"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """The adapter under test, on a log of this test's own."""
    nc = None
    made: JetStreamHarness | KafkaHarness | MemoryHarness
    if request.param == "jetstream":
        server: NatsServer = request.getfixturevalue("nats_server")
        nc = await nats.connect(server.url)
        made = JetStreamHarness(server, nc)
    elif request.param == "kafka":
        made = KafkaHarness(
            request.getfixturevalue("kafka_server"), request.getfixturevalue("kafka_topic")
        )
    else:
        made = MemoryHarness()
    try:
        yield made
    finally:
        await made.close()
        if nc is not None:
            await nc.close()


@pytest.fixture
async def log(harness: Harness) -> EventLog:
    """The writer's handle on a new, empty log."""
    return await harness.open()


# --- helpers -------------------------------------------------------------------------------


async def read_all(
    log: EventLog, start: Positions | None = None, *, batch: int = 1000
) -> list[LogRecord]:
    """Everything ``read(start, follow=False)`` yields, failing if it does not end."""

    async def read() -> list[LogRecord]:
        return [r async for records in log.read(start, follow=False, batch=batch)
                for r in records]  # fmt: skip

    return await asyncio.wait_for(read(), READ_DEADLINE_S)


async def visible(log: EventLog, records: Iterable[LogRecord]) -> Positions:
    """Wait until readers can see ``records``: ``end_positions`` has passed each of them
    (see the first test of the contract); returns those end positions."""
    needed = advance({}, list(records))

    async def passed() -> Positions | None:
        end = await log.end_positions()
        return end if covers(end, needed) else None

    end: Positions = await eventually(passed, timeout=60, interval=0.02)
    return end


def places(records: Iterable[LogRecord]) -> dict[tuple[int, int], str]:
    """(partition, position) -> event id."""
    return {(r.partition, r.position): r.event.event_id for r in records}


def ids(records: Iterable[LogRecord]) -> set[str]:
    return {r.event.event_id for r in records}


def by_partition(records: Iterable[LogRecord]) -> dict[int, list[int]]:
    """Positions per partition, in the order of ``records``."""
    out: dict[int, list[int]] = defaultdict(list)
    for r in records:
        out[r.partition].append(r.position)
    return out


# --- the contract ------------------------------------------------------------------------


async def test_appended_records_become_visible_to_readers(log: EventLog) -> None:
    """When ``append`` returns, its records are in the log for good; readers see them
    once ``end_positions`` has passed them, and from then on every read includes them.
    At once on JetStream and the memory log; on Kafka a moment later: the commit
    markers of a transaction are written after the commit returns, and a reader of
    committed records (``read_committed``) sees the transaction only then."""
    appended = [r for b in range(3) for r in await log.append(
        [registered(n) for n in range(b * 40, b * 40 + 40)])]  # fmt: skip
    end = await visible(log, appended)
    assert places(await read_all(log)) == places(appended)
    assert await read_all(log, end) == []


async def test_a_new_log_reads_empty(log: EventLog) -> None:
    """A new log has nothing to read: a read that does not follow yields nothing and
    ends, from the start or from the end positions."""
    assert await read_all(log) == []
    assert await read_all(log, await log.end_positions()) == []


async def test_append_returns_each_event_with_the_position_it_was_stored_at(
    log: EventLog,
) -> None:
    """Records come back in the order of the events, each with a position in its
    partition between the end before the append and the end after it; positions rise
    in append order within a partition, across appends too."""
    first_events = [registered(n) for n in range(30)]
    second_events = [registered(n) for n in range(30, 60)]
    before = await log.end_positions()
    first = await log.append(first_events)
    middle = await visible(log, first)
    second = await log.append(second_events)
    after = await visible(log, second)

    assert [r.event for r in first] == first_events
    assert [r.event for r in second] == second_events
    for records, low, high in ((first, before, middle), (second, middle, after)):
        for r in records:
            assert low.get(r.partition, 0) <= r.position < high[r.partition], (r, low, high)
    for positions in by_partition(first + second).values():
        assert positions == sorted(set(positions))


async def test_appending_nothing_stores_nothing(log: EventLog) -> None:
    """An empty append returns no records and leaves the log as it was."""
    end = await visible(log, await log.append([registered(1)]))
    assert await log.append([]) == []
    assert await log.end_positions() == end
    assert ids(await read_all(log)) == {"reg-default-1"}


async def test_a_read_gives_back_what_was_appended(log: EventLog) -> None:
    """Reading from the start gives every record appended, each event equal to the one
    appended, at the position the append reported, in position order per partition."""
    appended = [r for b in range(3) for r in await log.append(
        [registered(n) for n in range(b * 40, b * 40 + 40)])]  # fmt: skip
    await visible(log, appended)
    read = await read_all(log, batch=7)
    assert places(read) == places(appended)
    assert len(read) == len(appended)
    events = {(r.partition, r.position): r.event for r in appended}
    assert all(r.event == events[r.partition, r.position] for r in read)
    for positions in by_partition(read).values():
        assert positions == sorted(positions)


async def test_a_read_from_a_position_gives_exactly_the_records_at_or_after_it(
    log: EventLog,
) -> None:
    """Positions name a place per partition: a read from the middle of each partition
    gives exactly the records at or after it (a partition not named: all of it); a
    read from the end positions gives nothing."""
    appended = await log.append([registered(n) for n in range(60)])
    end = await visible(log, appended)
    positions = by_partition(appended)
    middle = {p: ps[len(ps) // 2] for p, ps in positions.items()}
    expected = {(r.partition, r.position) for r in appended
                if r.position >= middle[r.partition]}  # fmt: skip
    assert set(places(await read_all(log, middle))) == expected
    assert await read_all(log, end) == []
    if len(middle) > 1:  # several partitions: one left out is read whole
        p, *rest = sorted(middle)
        partial = {q: middle[q] for q in rest}
        got = set(places(await read_all(log, partial)))
        assert got == {k for k in expected if k[0] != p} | {(p, n) for n in positions[p]}


async def test_end_positions_is_where_the_next_records_go(log: EventLog) -> None:
    """``end_positions`` is the next position of every partition: a later append stores
    at or after it, and a read from it gives exactly what was appended since (which is
    how a checkpoint is used)."""
    end = await visible(log, await log.append([registered(n) for n in range(20)]))
    later = await log.append([registered(n) for n in range(20, 45)])
    assert all(r.position >= end.get(r.partition, 0) for r in later)
    await visible(log, later)
    assert places(await read_all(log, end)) == places(later)


async def test_appending_the_same_events_again_keeps_each_at_most_twice(log: EventLog) -> None:
    """At least once: a batch is appended again after an outcome the writer could not
    know (here half of it was stored). The append succeeds and reports, for each event,
    a position that holds that event. The port does not promise deduplication
    (JetStream drops the copies by ``Nats-Msg-Id``; Kafka and the memory log store
    them again), so readers see each event once or twice, never lost, never more."""
    events = [registered(n) for n in range(20)]
    first = await log.append(events[:10])
    again = await log.append(events)
    assert [r.event for r in again] == events

    await visible(log, first + again)
    read = await read_all(log)
    stored = {(r.partition, r.position): r.event for r in read}
    for r in first + again:
        assert stored.get((r.partition, r.position)) == r.event, r
    copies = Counter(r.event.event_id for r in read)
    assert set(copies) == {e.event_id for e in events}
    assert all(1 <= n <= 2 for n in copies.values()), copies


async def test_a_following_reader_sees_what_is_appended_after_it_started(log: EventLog) -> None:
    """A reader that follows from the end positions gets the records appended later,
    none of those before, and keeps waiting for more once it has them."""
    earlier = await log.append([registered(n) for n in range(10)])
    start = await visible(log, earlier)
    seen: list[LogRecord] = []

    async def follow() -> None:
        async for records in log.read(start, follow=True, batch=100):
            seen.extend(records)

    reader = asyncio.create_task(follow())
    try:
        later = await log.append([registered(n) for n in range(10, 20)])
        await eventually(lambda: ids(later) <= ids(seen), timeout=60)
        # It has caught up and waits: what comes next reaches it too.
        last = await log.append([registered(n) for n in range(20, 25)])
        await eventually(lambda: ids(last) <= ids(seen), timeout=60)
        assert not reader.done()
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    assert not ids(earlier) & ids(seen)
    assert places(seen) == places(later + last)


async def test_a_read_that_does_not_follow_ends_after_all_it_began_with_under_load(
    log: EventLog,
) -> None:
    """A read without ``follow`` gives every record that was in the log when it began
    and ends, while thousands of records are appended in batches just before and during
    it: a fetch that comes back short or empty under load is not the end."""
    before = [r for b in range(8) for r in await log.append(
        [registered(n) for n in range(b * 500, b * 500 + 500)])]  # fmt: skip
    appended = list(before)
    await visible(log, before)

    async def keep_appending() -> None:
        for b in range(8, 16):
            appended.extend(await log.append(
                [registered(n) for n in range(b * 500, b * 500 + 500)]))  # fmt: skip
            await asyncio.sleep(0)

    writer = asyncio.create_task(keep_appending())
    try:
        read = await read_all(log, batch=300)
    finally:
        await writer
    assert ids(before) <= ids(read), len(ids(before) - ids(read))
    assert set(places(read)) <= set(places(appended))
    assert len(read) == len(places(read))


async def test_a_read_that_does_not_follow_ends_after_all_it_began_with_while_held(
    harness: Harness, log: EventLog
) -> None:
    """The server stops answering for a moment in the middle of a read (held: starved
    of CPU, paused), longer than a fetch waits: the read still gives every record
    that was there when it began, and ends only then."""
    appended = [r for b in range(6) for r in await log.append(
        [registered(n) for n in range(b * 500, b * 500 + 500)])]  # fmt: skip
    await visible(log, appended)
    read: list[LogRecord] = []

    async def read_holding_once() -> None:
        async for records in log.read(None, follow=False, batch=100):
            if not read:
                harness.hold(1.5)
            read.extend(records)

    await asyncio.wait_for(read_holding_once(), READ_DEADLINE_S)
    assert ids(read) == ids(appended), len(ids(appended) - ids(read))


async def test_what_is_not_an_event_is_left_out_by_readers(harness: Harness, log: EventLog) -> None:
    """Something put in the log that is not an event (anyone allowed to publish there
    could) is logged and left out by every reader, following or not; the events
    around it are all read."""
    before = await log.append([registered(n) for n in range(5)])
    start = await visible(log, before)
    for data in NOT_EVENTS:
        await harness.put_foreign(data)
    after = await log.append([registered(n) for n in range(5, 10)])
    await visible(log, after)
    with capture_logs() as logs:
        read = await read_all(log, batch=3)
    assert places(read) == places(before + after)
    skipped = [e for e in logs if e["event"] == "log_record_not_an_event_skipped"]
    assert len(skipped) == len(NOT_EVENTS), logs

    seen: list[LogRecord] = []

    async def follow() -> None:
        async for records in log.read(start, follow=True):
            seen.extend(records)

    reader = asyncio.create_task(follow())
    try:
        await eventually(lambda: ids(after) <= ids(seen), timeout=60)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    assert places(seen) == places(after)


async def test_the_log_keeps_only_the_latest_heartbeat_of_each_instance(
    harness: Harness, log: EventLog
) -> None:
    """Heartbeats (and infrastructure check results) are superseded by the next one of
    the same instance (component): the log keeps every other event, the latest of each,
    and of the superseded ones at most a few per instance, however many rounds came.
    JetStream and the memory log keep exactly the latest at all times; Kafka's cleaner
    compacts closed segments in the background, lazily (it waits until a good part of
    a partition is superseded), so the test waits for it."""
    instances, rounds = 20, 16
    kept = await log.append([registered(n) for n in range(instances)])
    for r in range(rounds):
        await log.append([heartbeat(n, r) for n in range(instances)] + [infra_checked("db", r)])
        if not harness.rolls_up_at_once:
            await asyncio.sleep(0.12)  # traffic over time: Kafka closes segments meanwhile
    kept += await log.append([registered(n) for n in range(instances, instances + 5)])
    await visible(log, kept)

    async def bounded() -> list[LogRecord] | None:
        read = await read_all(log)
        beats = [r for r in read if isinstance(r.event, HeartbeatReceived)]
        return read if len(beats) <= 5 * instances else None  # of 16 per instance

    read = await eventually(bounded, timeout=60, interval=0.5)
    assert len(read) == len(places(read)) == len(ids(read))  # nothing twice
    assert ids(kept) <= ids(read)
    latest = {heartbeat(n, rounds - 1).event_id for n in range(instances)}
    latest.add(infra_checked("db", rounds - 1).event_id)
    assert latest <= ids(read)
    if harness.rolls_up_at_once:
        assert ids(read) == ids(kept) | latest


async def test_a_read_only_handle_reads_the_log_but_cannot_append(
    harness: Harness, log: EventLog
) -> None:
    """A handle opened read-only (replay, verify, the views process) reads what the
    writer appended; its append raises and stores nothing."""
    appended = await log.append([registered(n) for n in range(15)])
    end = await visible(log, appended)
    reader = await harness.open(read_only=True)
    assert places(await read_all(reader)) == places(appended)
    assert await reader.end_positions() == end
    with pytest.raises(RuntimeError):
        await reader.append([registered(99)])
    assert await log.end_positions() == end
    assert places(await read_all(log)) == places(appended)


async def test_opening_a_missing_log_read_only_does_not_create_it(harness: Harness) -> None:
    """A reader never creates the log: opening one that does not exist read-only fails
    with ``EventLogNotFound`` and the log still does not exist."""
    reader = harness.missing()
    with pytest.raises(EventLogNotFound):
        await reader.start()
    await reader.close()
    assert not await harness.missing_exists()
