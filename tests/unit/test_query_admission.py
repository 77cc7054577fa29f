"""Admission and bounded work of the query servers, and the progress replica, without
servers: the admission's arithmetic on a fake clock, the query timeout and its pause for
min_seq on stand-in views, the mapping of store failures to BUSY/UNAVAILABLE, and the
replica fed with the hub's progress."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from hub.config import HubConfig
from hub.metrics import Metrics
from hub.progress import Progress, ProgressFollower, ProgressUpdate
from hub.queries import (
    REDIS_VIEW,
    SMALL,
    Admission,
    Answer,
    PoolExhausted,
    QueryService,
    size_class,
    store_error,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_query_of_an_unmeasured_kind_gets_a_fair_share():
    """Nothing known about a kind of query: it is estimated at budget / max_working, so
    a storm of it cannot all come in before one is measured (past the budget only half
    of the lane for small queries takes it), yet a new kind gets in beside measured
    queries that leave room."""
    clock = Clock()
    a = Admission(budget_s=1.0, max_working=4, max_fast=2, clock=clock)
    first = [a.enter("services") for _ in range(4)]
    assert all(t is not None and not t.fast for t in first)  # 4 x 0.25 fills the budget
    lane = a.enter("services")
    assert lane is not None and lane.fast  # not measured yet: half the lane takes one
    assert a.enter("services") is None and a.enter("health") is None  # that half is full
    small = a.enter("pick", small=True)
    assert small is not None and small.fast  # the other half is kept for small ones
    a.leave(small, measured=False)
    a.leave(first[0], measured=False)
    a.leave(lane, measured=False)
    health = a.enter("health")
    assert health is not None and not health.fast  # a share is free again
    b = Admission(budget_s=1.0, max_working=4, max_fast=0, clock=clock)
    t = b.enter("dear")
    clock.now += 0.6
    b.leave(t, measured=True)
    dear = b.enter("dear")
    assert dear is not None and b.enter("dear") is None  # 0.6 + 0.6 > 1
    assert b.enter("new kind") is not None  # 0.6 + 0.25 fits


def test_small_queries_get_in_beside_a_full_budget_and_big_ones_do_not():
    """A storm of big pages fills the budget and max_working; a small query (a pick, a
    short page) still gets in, max_fast of them at once, whatever its estimate (inflated
    by a busy moment), and leaves its place to the next; a big page stays refused, even
    one measured cheap. Without the lane (max_fast 0) the small one is refused too."""
    clock = Clock()
    for max_fast in (2, 0):
        a = Admission(budget_s=1.0, max_working=4, max_fast=max_fast, clock=clock)
        for key, cost in (("page", 0.25), ("pick", 0.4), ("cheap page", 0.001)):
            t = a.enter(key)
            clock.now += cost
            a.leave(t, measured=True)
        pages = [a.enter("page") for _ in range(4)]
        assert all(t is not None for t in pages) and a.enter("page") is None
        assert a.enter("cheap page") is None  # max_working; not small
        picks = [a.enter("pick", small=True) for _ in range(max_fast)]
        assert all(t is not None and t.fast for t in picks)
        assert a.enter("pick", small=True) is None  # the lane is full (or there is none)
        if picks:
            a.leave(picks[0], measured=True)
            assert a.enter("pick", small=True) is not None and a.enter("page") is None
            assert a.fast == max_fast and a.working == 4 + max_fast


def test_measured_queries_are_let_in_while_their_cost_fits_the_budget():
    """Measured at 0.3 s each, three fit a 1 s budget and a fourth is refused; a cheap
    kind still fits beside them, and max_working caps the count whatever the cost."""
    clock = Clock()
    a = Admission(budget_s=1.0, max_working=5, max_fast=0, clock=clock)
    for key, cost in (("dear", 0.3), ("cheap", 0.01)):
        t = a.enter(key)
        clock.now += cost
        a.leave(t, measured=True)
    assert a.cost_s == pytest.approx({"dear": 0.3, "cheap": 0.01})
    dear = [a.enter("dear") for _ in range(3)]
    assert all(t is not None for t in dear)
    assert a.enter("dear") is None
    cheap = a.enter("cheap")
    assert cheap is not None
    assert a.enter("cheap") is not None  # 0.9 + 0.01 + 0.01 <= 1.0
    assert a.working == 5 and a.enter("cheap") is None  # max_working


def test_cost_is_measured_as_a_share_of_the_core():
    """Two queries working side by side for 1 s each get half of it: 0.5 s each, not 1 s;
    the one that goes on alone for another 0.5 s has cost 1 s."""
    clock = Clock()
    a = Admission(budget_s=10.0, clock=clock)
    a.cost_s["q"] = 0.1  # known, so both are let in
    one, two = a.enter("q"), a.enter("q")
    clock.now = 1.0
    a.leave(two, measured=True)
    assert a.cost_s["q"] == pytest.approx(0.5)
    clock.now = 1.5
    a.leave(one, measured=True)
    assert a.cost_s["q"] == pytest.approx(1.0)
    assert a.working == 0 and a.load_s == 0.0


def test_a_dearer_measurement_counts_at_once_a_cheaper_one_a_tenth():
    """The estimate is a peak-EWMA: up at once to a dearer cost, down by a tenth of the
    difference per cheaper one."""
    clock = Clock()
    a = Admission(budget_s=10.0, clock=clock)
    for cost, expected in ((1.0, 1.0), (2.0, 2.0), (0.0, 1.8), (0.0, 1.62)):
        t = a.enter("q")
        clock.now += cost
        a.leave(t, measured=True)
        assert a.cost_s["q"] == pytest.approx(expected)


def test_store_failures_are_busy_or_unavailable_and_bugs_are_not():
    """An exhausted pool is BUSY; a store that times out or cannot be reached is
    UNAVAILABLE; anything else is left to INTERNAL_ERROR (None)."""
    assert store_error(PoolExhausted("No connection available."), 2).code == "BUSY"
    assert store_error(redis.exceptions.MaxConnectionsError("Too many"), 2).code == "BUSY"
    assert store_error(redis.exceptions.TimeoutError("Timeout reading"), 2).code == "UNAVAILABLE"
    refused = redis.exceptions.ConnectionError("Error 111 connecting")
    assert store_error(refused, 2).code == "UNAVAILABLE"
    assert store_error(ConnectionRefusedError(), 2).code == "UNAVAILABLE"
    assert store_error(redis.exceptions.ResponseError("WRONGTYPE"), 2) is None
    assert store_error(KeyError("x"), 2) is None


# --- the query timeout, on stand-in views ---------------------------------------------------


def service(progress: Progress, timeout_s: float = 0.2, **views) -> QueryService:
    """A QueryService whose views are replaced by the given coroutines (its Redis client
    is never used: it points nowhere)."""
    config = HubConfig(query_timeout_s=timeout_s, min_seq_wait_s=5.0)
    qs = QueryService(aioredis.Redis(port=1), config, progress=progress, metrics=Metrics())
    qs._views.update(views)
    return qs


def code(reply: bytes) -> str | None:
    return msgspec.json.decode(reply)["error_code"]


async def test_a_store_that_does_not_answer_is_unavailable_within_the_query_timeout():
    """A view that never finishes is answered UNAVAILABLE once the query timeout passes,
    and the admission is left (the next query is let in)."""

    async def hangs(tenant: str, payload: bytes) -> Answer:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    qs = service(Progress(), services=hangs)
    assert code(await qs.handle("hub.query.services", b"{}")) == "UNAVAILABLE"
    assert qs.admission.working == 0


async def test_store_errors_are_mapped_and_a_bug_is_internal():
    """A view raising the store's errors answers BUSY or UNAVAILABLE; one raising
    anything else answers INTERNAL_ERROR; each leaves the admission."""

    def raising(exc: Exception):
        async def view(tenant: str, payload: bytes) -> Answer:
            raise exc

        return view

    qs = service(Progress(), services=raising(PoolExhausted("No connection available.")),
                 health=raising(redis.exceptions.ConnectionError("refused")),
                 infrastructure=raising(ZeroDivisionError()))  # fmt: skip
    assert code(await qs.handle("hub.query.services", b"{}")) == "BUSY"
    assert code(await qs.handle("hub.query.health", b"{}")) == "UNAVAILABLE"
    assert code(await qs.handle("hub.query.infrastructure", b"{}")) == "INTERNAL_ERROR"
    assert qs.admission.working == 0


async def test_the_min_seq_wait_is_not_counted_against_the_query_timeout():
    """A query waiting for min_seq longer than the query timeout is still answered once
    the view reflects it; it does not hold its place among the working queries while it
    waits (another query is let in meanwhile)."""
    progress = Progress()

    async def reads_after_min_seq(tenant: str, payload: bytes) -> Answer:
        await qs._await_seq(msgspec.json.decode(payload).get("min_seq"))
        await asyncio.sleep(0.01)  # the store's answer
        return Answer([])

    qs = service(progress, timeout_s=0.1, services=reads_after_min_seq)
    waiting = asyncio.create_task(qs.handle("hub.query.services", b'{"min_seq": 7}'))
    await asyncio.sleep(0.3)  # three query timeouts
    assert not waiting.done() and qs.admission.working == 0
    assert code(await qs.handle("hub.query.services", b"{}")) is None  # let in meanwhile
    await progress.appended(7, {0: 8})
    await progress.applied(REDIS_VIEW, {0: 8})
    assert code(await waiting) is None


# --- the progress replica ------------------------------------------------------------------


async def test_a_replica_answers_like_the_hub_from_live_updates_and_a_late_history():
    """Live updates give the replica the hub's entries and views; a history that arrives
    after them fills in older entries in order, without turning the views back; a
    min_seq between two known entries needs the later one's positions."""
    hub = Progress()
    for seq, pos in ((3, 10), (5, 20), (9, 30), (12, 40)):
        await hub.appended(seq, {0: pos})
    replica = Progress()
    follower = ProgressFollower(replica)
    await follower.apply(ProgressUpdate(hub="h", entries=hub.entries_after(5),
                                        views={REDIS_VIEW: {0: 40}}, status={"status": "OK"}),
                         live=True)  # fmt: skip
    assert replica.ingested_seq == 12 and replica.reflects(REDIS_VIEW, 12)
    assert replica.needed(4) == {0: 30}  # before the history: conservative
    await follower.apply(ProgressUpdate(hub="h", entries=hub.entries_after(0),
                                        views={REDIS_VIEW: {0: 10}}, status={"old": 1}),
                         live=False)  # fmt: skip
    assert replica.entries_after(0) == hub.entries_after(0)
    assert replica.needed(4) == hub.needed(4) == {0: 20}
    assert replica.views[REDIS_VIEW] == {0: 40}  # the history's views are older
    assert follower.status == {"status": "OK"}
    await follower.apply(ProgressUpdate(hub="h", views={REDIS_VIEW: {0: 5}}), live=True)
    assert replica.views[REDIS_VIEW] == {0: 5}  # a rebuilt view goes back: believed


def test_a_progress_update_keeps_its_integer_partitions_through_json():
    """Partitions are integers; JSON makes them strings and decoding makes them integers."""
    update = ProgressUpdate(hub="h", entries=[(5, {0: 7, 3: 9})], views={"v": {2: 4}})
    back = msgspec.json.decode(msgspec.json.encode(update), type=ProgressUpdate)
    assert back == update


def test_size_class_tells_small_queries_from_big_ones():
    """A pick and pages up to 16 are small; the default page (1,000) is not; what cannot
    be read (even nested too deep for the decoder) gets a class of its own: the query
    then answers what is wrong with it."""
    classes = {
        body: size_class(body)
        for body in (b'{"limit": 1}', b'{"limit": 16}', b'{"limit": 17}', b"{}", b"",
                     b'{"pick": "random"}', b'{"limit": "x"}', b"\xff", b"[1]",
                     b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    }  # fmt: skip
    assert classes == {
        b'{"limit": 1}': "1", b'{"limit": 16}': "16", b'{"limit": 17}': "64",
        b"{}": "1024", b"": "1024", b'{"pick": "random"}': "pick",
        b'{"limit": "x"}': "?", b"\xff": "?", b"[1]": "?",
        b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}": "?",
    }  # fmt: skip
    assert {c for c in classes.values() if c in SMALL} == {"1", "16", "pick"}
