"""The check scheduler against real local listeners: every component on its own grid of
``first + k * interval`` (no drift, however long a check takes), a hanging component
delaying nobody, busy slots skipped and counted, reloads keeping unchanged schedules, and
a bounded stop.

How far a check lands from its slot (ms) and the rate achieved are timing targets, for
``bench.monitor``; on a busy machine a check is late, and a loop stalled past a slot
makes the scheduler skip it (counted). What these tests check holds under any load:
every slot is accounted for, checked or skipped (see ``run_for``).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from hub.infra.checkers import CheckResult, run_check
from hub.infra.config import Component, HealthCheck, InfraConfig, Method
from hub.infra.scheduler import CheckScheduler
from tests.integration.conftest import eventually
from tests.integration.infra_http import HOST, Reply, serve_http

# How long to wait for a condition before failing: a hang guard, not a speed target.
PATIENCE = 30.0


class Recorder:
    """The scheduler's ``on_result``: keeps (checked_at, result) per component name."""

    def __init__(self) -> None:
        self.results: dict[str, list[tuple[float, CheckResult]]] = defaultdict(list)
        self.components: dict[str, list[Component]] = defaultdict(list)

    async def __call__(self, component: Component, result: CheckResult, checked_at: float) -> None:
        self.results[component.name].append((checked_at, result))
        self.components[component.name].append(component)

    def times(self, name: str) -> list[float]:
        return [at for at, _ in self.results[name]]


def component(
    name: str,
    method: Method,
    port: int,
    interval: float,
    timeout: float | None = None,
    **check: Any,
) -> Component:
    """A component on 127.0.0.1 whose timeout is its interval unless given."""
    health = HealthCheck(method=method, interval=interval, timeout=timeout or interval, **check)
    return Component(name=name, host=HOST, port=port, section="messaging", health_check=health)


class NoJitter(random.Random):
    """Puts every component's first check at the start of its first interval."""

    def uniform(self, a: float, b: float) -> float:
        return a


@dataclass
class Probe:
    """The scheduler's ``check``: ``run_check``, noting when (loop clock) each began."""

    begun: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    async def __call__(self, component: Component) -> CheckResult:
        self.begun[component.name].append(asyncio.get_running_loop().time())
        return await run_check(component)

    def count(self) -> Counter[str]:
        return Counter({name: len(times) for name, times in self.begun.items()})


def slots_due(first: float, until: float, interval: float) -> int:
    """How many of the slots ``first + k * interval`` (k = 0, 1, ...) are at or before
    ``until``."""
    return max(0, math.floor((until - first) / interval) + 1)


@dataclass
class Run:
    """Moments of a scheduler's run, on the event loop's clock."""

    before: float  # just before start(): no slot is earlier
    started: float  # as start() returned: every first slot was drawn, none later
    deadline: float  # the test woke here (then let the checks begun so far start)
    stopping: float  # stop() was called: no slot taken is later

    def accounted_for(self, taken: int, interval: float, *, jitter: bool) -> bool:
        """Whether ``taken`` slots of one component (checks begun + slots skipped) are
        every slot that came due by ``deadline`` at least, and none that had not come
        due by ``stopping``. The first slot is at ``started`` (no jitter), or within
        the first interval after it."""
        first_latest = self.started + (interval if jitter else 0.0)
        due = slots_due(first_latest, self.deadline, interval)
        return due <= taken <= slots_due(self.before, self.stopping, interval)


async def run_for(
    scheduler: CheckScheduler, until: Callable[[float], float | Awaitable[float]]
) -> Run:
    """Start ``scheduler``, run ``until(started)`` (which may act on the running
    scheduler), wake at the loop time it returns and stop the scheduler.

    Exact under any load: a ticker sleeps until its slot on the loop's clock and the loop
    runs due timers in the order of their times, so by the time this wakes at the
    deadline, every ticker whose slot came before has taken it (begun a check, or skipped
    the slot and counted it); one more turn of the loop lets the checks it started begin.
    Choose a deadline between two slots (two timers due at the same instant may run in
    either order).
    """
    loop = asyncio.get_running_loop()
    gc.collect()  # collecting earlier tests' garbage mid-run would stall the event loop
    before = loop.time()
    await scheduler.start()
    started = loop.time()
    try:
        deadline = until(started)
        if inspect.isawaitable(deadline):
            deadline = await deadline
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        await asyncio.sleep(0)  # the checks begun by the tickers that woke before this
    finally:
        stopping = loop.time()
        await scheduler.stop()
    return Run(before, started, float(deadline), stopping)


@pytest.fixture
async def tcp_port() -> AsyncIterator[int]:
    """A real TCP listener that accepts and closes every connection."""

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, HOST, 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_fifty_components_stay_on_schedule_next_to_slow_and_hanging_ones(
    tcp_port: int,
) -> None:
    """50 TCP components at 0.2 s for ~2 s take every slot due (from a first one within
    the first interval until the stop: ~500 checks, less whatever a stalled loop made the
    scheduler skip and count) and none more; so do an HTTP component whose answer takes
    0.1 s (sleeping an interval after each check would drift 0.1 s per check and take a
    third fewer) and one whose server never answers, which is reported timed out without
    delaying anybody (checking one after the other would starve them all)."""
    interval = 0.2
    async with serve_http() as server:
        server.routes["/slow"] = Reply(delay=0.1)
        server.routes["/hang"] = Reply(hang=True)
        tcp = [component(f"tcp-{i}", "tcp", tcp_port, interval) for i in range(50)]
        slow = component("slow", "http", server.port, interval, endpoint="/slow")
        hanging = component("hanging", "http", server.port, interval, endpoint="/hang")
        recorder, probe = Recorder(), Probe()
        scheduler = CheckScheduler(InfraConfig(components=(*tcp, slow, hanging)), recorder,
                                   check=probe, rng=random.Random(7))  # fmt: skip
        # Ten slots and a half: the first slots are spread over the first interval.
        run = await run_for(scheduler, lambda started: started + 10.5 * interval)

    stats, begun = scheduler.stats(), probe.count()
    assert slots_due(run.started + interval, run.deadline, interval) == 10
    for c in (*tcp, slow, hanging):
        taken = begun[c.name] + stats[c.name].skipped
        assert run.accounted_for(taken, interval, jitter=True), (c.name, taken, run, stats)
        assert stats[c.name].checks == len(recorder.results[c.name])
        # None begins before its slot: the k-th check is on slot k or later.
        starts = probe.begun[c.name]
        assert all(t >= run.before + k * interval for k, t in enumerate(starts)), c.name
    assert all(r.status == "HEALTHY" for c in tcp for _, r in recorder.results[c.name])
    assert all(r.response_time_ms >= 100 for _, r in recorder.results["slow"])

    hung = [r for _, r in recorder.results["hanging"]]
    assert hung and all(r.error == "timed out after 0.2 s" for r in hung)
    assert scheduler.checks == sum(len(results) for results in recorder.results.values())


async def test_a_busy_slot_is_skipped_and_counted(tcp_port: int) -> None:
    """While a check (here its result handler) still runs at the next slots, they are
    skipped and counted, not piled up; later checks stay on the original grid."""
    interval = 0.1
    loop = asyncio.get_running_loop()
    recorder, probe = Recorder(), Probe()
    release = asyncio.Event()
    released_at: list[float] = []

    async def slow_first(component: Component, result: CheckResult, checked_at: float) -> None:
        await recorder(component, result, checked_at)
        if len(recorder.results[component.name]) == 1:
            await release.wait()  # busy until released

    async def release_at(at: float) -> None:
        """Release the first check at ``at`` (loop clock): its slots 1 and 2 have come."""
        await asyncio.sleep(max(0.0, at - loop.time()))
        released_at.append(loop.time())
        release.set()

    config = InfraConfig(components=(component("busy", "tcp", tcp_port, interval),))
    scheduler = CheckScheduler(config, slow_first, check=probe, rng=NoJitter())
    releaser: list[asyncio.Task[None]] = []

    def until(started: float) -> float:
        releaser.append(asyncio.create_task(release_at(started + 2.5 * interval)))
        return started + 6.25 * interval  # after slot 6, before slot 7

    run = await run_for(scheduler, until)
    await releaser[0]

    stats = scheduler.stats()["busy"]
    assert scheduler.skipped == stats.skipped >= 2  # slots 1 and 2, at least
    begun = probe.begun["busy"]
    assert len(begun) >= 2 and begun[1] > released_at[0]  # none piled up while busy
    # The original grid: slots 0..6 all taken (a grid restarted at the release would
    # have taken fewer by now), and none before its time: after slot 0, the k-th check
    # is on slot k + 2 or later (one started at the release would be early).
    taken = len(begun) + stats.skipped
    assert run.accounted_for(taken, interval, jitter=False), (taken, run, stats)
    assert all(t >= run.before + (k + 2) * interval for k, t in enumerate(begun) if k), begun


async def test_replace_keeps_unchanged_schedules(tcp_port: int) -> None:
    """After replace(): an unchanged component keeps its grid and counts, a changed one is
    checked with its new settings, a new one starts and a removed one stops."""
    interval = 0.1
    loop = asyncio.get_running_loop()
    keep = component("keep", "tcp", tcp_port, interval)
    change = component("change", "tcp", tcp_port, interval)
    gone = component("gone", "tcp", tcp_port, interval)
    recorder, probe = Recorder(), Probe()
    scheduler = CheckScheduler(InfraConfig(components=(keep, change, gone)), recorder,
                               check=probe, rng=NoJitter())  # fmt: skip
    marks: dict[str, Any] = {}

    async def until(started: float) -> float:
        def checked(name: str, n: int, after: float = 0.0) -> bool:
            return len([t for t in recorder.times(name) if t > after]) >= n

        await eventually(lambda: checked("keep", 3), timeout=PATIENCE, interval=0.01)
        marks["before"] = scheduler.stats()["keep"].checks
        changed = component("change", "tcp", tcp_port, interval, timeout=interval / 2)
        added = component("added", "tcp", tcp_port, interval)
        await scheduler.replace(InfraConfig(components=(keep, changed, added)))
        marks["replaced_at"] = replaced_at = time.time()
        await eventually(lambda: checked("added", 3) and checked("change", 1, replaced_at)
                         and checked("keep", 1, replaced_at), timeout=PATIENCE,
                         interval=0.01)  # fmt: skip
        return started + (math.ceil((loop.time() - started) / interval) + 0.5) * interval

    run = await run_for(scheduler, until)
    before, replaced_at = marks["before"], marks["replaced_at"]

    assert set(scheduler.stats()) == {"keep", "change", "added"}
    keep_times = recorder.times("keep")
    assert scheduler.stats()["keep"].checks == len(keep_times) > before >= 3
    # One grid across the replace: every slot of "keep" since the start is accounted for.
    taken = len(probe.begun["keep"]) + scheduler.stats()["keep"].skipped
    assert run.accounted_for(taken, interval, jitter=False), (taken, run)
    assert all(t < replaced_at for t in recorder.times("gone"))
    after = [c for c, t in zip(recorder.components["change"], recorder.times("change"), strict=True)
             if t > replaced_at]  # fmt: skip
    assert after and all(c.health_check.timeout == interval / 2 for c in after)
    assert len(recorder.results["added"]) >= 3


async def test_stop_is_bounded_and_ends_the_callbacks() -> None:
    """stop() cancels a check stuck on a silent server (it does not wait for the check's
    10 s timeout: the scheduler's own bound of 5 s on stopping would then be reached and
    logged) and no result arrives afterwards."""
    recorder = Recorder()
    async with serve_http(Reply(hang=True)) as server:
        stuck = component("stuck", "http", server.port, 10.0, timeout=10.0)
        scheduler = CheckScheduler(InfraConfig(components=(stuck,)), recorder, rng=NoJitter())
        await scheduler.start()
        await asyncio.wait_for(server.requested.wait(), PATIENCE)  # the check is under way
        with capture_logs() as logs:
            await scheduler.stop()
        assert [e for e in logs if e["event"] == "infra.tasks_not_stopped"] == []
        await asyncio.sleep(0.1)
    assert recorder.results["stuck"] == []
    assert scheduler.checks == 0


async def test_a_failing_result_handler_is_logged_and_the_schedule_goes_on(tcp_port: int) -> None:
    """An exception in on_result is logged (infra.on_result_failed) and later checks still
    happen."""
    calls = 0

    async def explode(component: Component, result: CheckResult, checked_at: float) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("handler broke")

    config = InfraConfig(components=(component("c", "tcp", tcp_port, 0.05),))
    scheduler = CheckScheduler(config, explode)
    with capture_logs() as logs:
        await scheduler.start()
        try:
            await eventually(lambda: calls >= 4, timeout=PATIENCE, interval=0.01)
        finally:
            await scheduler.stop()
    failures = [e for e in logs if e["event"] == "infra.on_result_failed"]
    assert len(failures) == calls and failures[0]["component"] == "c"
