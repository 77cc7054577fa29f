"""The JetStream log's batched append, and projectors fed by the log tail (real servers).

* ``JetStreamEventLog.append`` sends a batch as plain publishes with one PubAck and
  checks the sequence arithmetic; whatever breaks it (a duplicate batch, another
  writer) must still give every record its true position.
* ``run_projection`` with a ``LogTail``: reads the log to catch up, joins the tail,
  falls back to the log when the tail overflows, and the view still equals the fold.
"""

from __future__ import annotations

import asyncio

import nats.js.errors
import pytest
import redis.asyncio as aioredis

from events.codec import decode_event
from events.log import LogRecord, covers
from events.model import Event, HeartbeatReceived, ServiceRegistered
from hub.eventlog.jetstream import JetStreamEventLog
from hub.metrics import Metrics
from hub.progress import Progress
from hub.projector import run_projection
from hub.tail import LogTail, TailOverflow
from projections.redis import RedisRegistryProjection
from tests.integration.conftest import eventually
from tests.integration.test_projection_model import expected_lines

T0 = 1_750_000_000.0


def registered(n: int, seq: int) -> ServiceRegistered:
    return ServiceRegistered(
        event_id=f"ingress-{seq}", tenant="default", ts=T0 + seq, ingress_seq=seq,
        service_name="orders", instance_id=f"i-{n}", host="10.0.0.1", port=8000 + n,
        heartbeat_interval_s=10.0, ttl_s=30.0, expire_after_s=60.0,
    )  # fmt: skip


def heartbeat(n: int, seq: int) -> HeartbeatReceived:
    return HeartbeatReceived(
        event_id=f"ingress-{seq}", tenant="default", ts=T0 + seq, ingress_seq=seq,
        service_name="orders", instance_id=f"i-{n}", status="degraded", load=seq / 1000,
        last_seen=T0 + seq,
    )  # fmt: skip


async def test_a_batch_append_reports_the_positions_the_stream_gave(nc) -> None:
    """Fast path from the first append (the stream's end read at start), a re-sent batch
    (all duplicates: their original positions), another writer in between (the
    arithmetic no longer holds: each message acknowledged)."""
    log = JetStreamEventLog(nc)
    await log.start()
    first = [registered(n, n) for n in range(1, 51)]
    records = await log.append(first)  # the sequence arithmetic, one PubAck
    assert [r.position for r in records] == list(range(1, 51))
    assert log.exclusive
    second = [heartbeat(n, 50 + n) for n in range(1, 51)]
    records = await log.append(second)  # the sequence arithmetic, one PubAck
    assert [r.position for r in records] == list(range(51, 101))

    again = await log.append(second)  # at-least-once: the same batch once more
    assert [r.position for r in again] == list(range(51, 101))

    await nc.jetstream().publish("hub.log.default.Foreign", b"{}")  # seq 101
    third = [heartbeat(n, 100 + n) for n in range(1, 11)]
    records = await log.append(third)
    assert [r.position for r in records] == list(range(102, 112))
    fourth = [heartbeat(n, 110 + n) for n in range(1, 11)]
    records = await log.append(fourth)
    assert [r.position for r in records] == list(range(112, 122))

    stored = await stored_events(log)
    assert {p: stored[p] for p in range(112, 122)} == {
        112 + i: e.event_id for i, e in enumerate(fourth)
    }
    # Every registration; the heartbeats of i-11..i-50 from the second batch; the last
    # heartbeat of i-1..i-10 (each rolled up its predecessors); nothing twice.
    assert len(stored) == 50 + 40 + 10 and len(set(stored.values())) == len(stored)


async def stored_events(log: JetStreamEventLog) -> dict[int, str]:
    """Sequence -> event id of every event message in the stream (not the foreign one)."""
    js = log._js
    info = await js.stream_info(log.stream)
    out = {}
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(log.stream, seq)
        except nats.js.errors.NotFoundError:  # rolled up
            continue
        if not msg.subject.endswith(".Foreign"):
            out[seq] = decode_event(msg.data).event_id
    return out


async def test_a_projector_catches_up_joins_the_tail_and_survives_its_overflow(
    nc, redis_server
) -> None:
    """Registrations are in the log before the projector starts (read from the log),
    then heartbeats come through the tail; while Redis is paused the tail overflows and
    the projector reads the log again, then joins again. The view equals the fold of
    the whole log throughout, and nothing is applied twice."""
    log = JetStreamEventLog(nc)
    await log.start()
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port,
                            decode_responses=True)  # fmt: skip
    view = RedisRegistryProjection(client)
    tail = LogTail(limit=40)
    progress, metrics = Progress(), Metrics()
    stop = asyncio.Event()
    everything: list[LogRecord] = []
    seq = 0

    async def append(events: list[Event]) -> None:
        records = await log.append(events)
        everything.extend(records)
        tail.publish(records, complete=log.exclusive)  # as the ingest loop does
        await progress.appended(records[-1].event.ingress_seq, {0: records[-1].position + 1})

    async def applied_all() -> bool:
        return covers(progress.views.get(view.name, {}), {0: everything[-1].position + 1})

    async def view_is_the_fold() -> None:
        _, lines = await view.snapshot()
        assert lines == expected_lines("redis", everything)

    for n in range(1, 31):
        seq += 1
        await append([registered(n, seq)])
    task = asyncio.create_task(run_projection(log, view, progress=progress, metrics=metrics,
                                              stop=stop, tail=tail, batch=16))  # fmt: skip
    try:
        await eventually(applied_all, timeout=30)
        await view_is_the_fold()
        await eventually(lambda: metrics.get(f"projection_tail_joined:{view.name}") == 1)

        batch = []
        for n in range(1, 31):
            seq += 1
            batch.append(heartbeat(n, seq))
        await append(batch)  # through the tail
        await eventually(applied_all, timeout=30)
        await view_is_the_fold()
        assert metrics.get(f"projection_tail_overflows:{view.name}") == 0

        # The projector is stuck on its writes until the appends are done, however long
        # they take: paused for longer than any run, unpaused when they are in.
        await client.execute_command("CLIENT", "PAUSE", "120000", "WRITE")
        try:
            for _ in range(3):  # 90 records > the tail's 40, while the projector is stuck
                batch = []
                for n in range(1, 31):
                    seq += 1
                    batch.append(heartbeat(n, seq))
                await append(batch)
        finally:
            await client.execute_command("CLIENT", "UNPAUSE")
        await eventually(applied_all, timeout=30)
        await view_is_the_fold()
        assert metrics.get(f"projection_tail_overflows:{view.name}") == 1
        assert metrics.get(f"projection_tail_joined:{view.name}") == 2

        # Another writer appends (out of the model, but not silently lost): the hub's
        # next append notices, the tail cannot vouch for the gap, the projector reads
        # the log again and the other writer's registration is in the view.
        other = JetStreamEventLog(nc)
        await other.start()
        seq += 1
        foreign = await other.append([registered(99, seq)])
        everything.extend(foreign)
        seq += 1
        await append([heartbeat(1, seq)])
        assert not log.exclusive
        everything.sort(key=lambda r: r.position)
        await eventually(applied_all, timeout=30)
        await view_is_the_fold()
        assert metrics.get(f"projection_tail_overflows:{view.name}") == 2
        assert metrics.get(f"projection_restarts:{view.name}") == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)  # a hang guard
        await client.aclose()


async def test_a_subscription_buffers_in_order_and_overflows_at_its_limit() -> None:
    tail = LogTail(limit=5)
    tail.reset({0: 10})
    sub = tail.subscribe()
    assert sub.start == {0: 10}
    records = [LogRecord(0, 10 + i, registered(i, i)) for i in range(4)]
    tail.publish(records[:2])
    tail.publish(records[2:])
    assert tail.appended == {0: 14}
    assert await sub.get(3, timeout=0.1) == records[:3]  # in order, at most 3: a batch split
    assert await sub.get(3, timeout=0.1) == records[3:]
    assert await sub.get(3, timeout=0.05) == []
    tail.publish(records[:1])
    assert await sub.get(3, timeout=0.1) == records[:1]  # the count kept up with the split
    tail.publish([LogRecord(0, 14 + i, registered(i, i)) for i in range(6)])  # 6 > limit 5
    with pytest.raises(TailOverflow):
        await sub.get(100, timeout=0.1)
    late = tail.subscribe()
    assert late.start == {0: 20}
    tail.publish([LogRecord(0, 21, registered(1, 21))], complete=False)  # a gap at 20
    with pytest.raises(TailOverflow):
        await late.get(100, timeout=0.1)
    assert tail.appended == {0: 22}
    sub.close()
    late.close()
