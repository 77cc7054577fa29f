"""The check scheduler against real local listeners: every component on its own grid of
``first + k * interval`` (no drift, however long a check takes), a hanging component
delaying nobody, busy slots skipped and counted, reloads keeping unchanged schedules, and
a bounded stop."""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from hub.infra.checkers import CheckResult
from hub.infra.config import Component, HealthCheck, InfraConfig, Method
from hub.infra.scheduler import CheckScheduler
from tests.integration.infra_http import HOST, Reply, serve_http


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


def slots(times: list[float], interval: float) -> list[int]:
    """The slot number of each check time, counted from the first."""
    return [round((t - times[0]) / interval) for t in times]


def grid_error(times: list[float], interval: float) -> float:
    """How far (s) a check is from its slot ``first + k * interval``, at worst."""
    numbered = zip(slots(times, interval), times, strict=True)
    return max(abs(t - times[0] - k * interval) for k, t in numbered)


@pytest.fixture
async def tcp_port() -> AsyncIterator[int]:
    """A real TCP listener that accepts and closes every connection."""

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, HOST, 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def run_for(scheduler: CheckScheduler, seconds: float) -> tuple[float, float]:
    """Run ``scheduler`` for ``seconds``; the wall-clock times the schedules started (when
    start() returned) and stop() was called."""
    gc.collect()  # collecting earlier tests' garbage mid-run would stall the event loop
    await scheduler.start()
    started = time.time()
    try:
        await asyncio.sleep(seconds)
    finally:
        stopping = time.time()
        await scheduler.stop()
    return started, stopping


async def test_fifty_components_stay_on_schedule_next_to_slow_and_hanging_ones(
    tcp_port: int,
) -> None:
    """50 TCP components at 0.2 s for 2 s achieve the ~500 checks due (every slot from a
    first one within the first interval until stop, none missed), each within a few ms of
    its own grid; an HTTP component whose answer takes 0.1 s stays on its grid too
    (sleeping an interval after each check would drift 0.1 s per check), and one whose
    server never answers is reported timed out without delaying anybody."""
    interval, window = 0.2, 2.0
    async with serve_http() as server:
        server.routes["/slow"] = Reply(delay=0.1)
        server.routes["/hang"] = Reply(hang=True)
        tcp = [component(f"tcp-{i}", "tcp", tcp_port, interval) for i in range(50)]
        slow = component("slow", "http", server.port, interval, endpoint="/slow")
        hanging = component("hanging", "http", server.port, interval, endpoint="/hang")
        recorder = Recorder()
        scheduler = CheckScheduler(
            InfraConfig(components=(*tcp, slow, hanging)), recorder, rng=random.Random(7)
        )
        started, stopping = await run_for(scheduler, window)

    firsts = [recorder.times(c.name)[0] for c in tcp]
    assert all(-0.01 <= first - started < interval + 0.05 for first in firsts)
    due = sum(int((stopping - first) // interval) + 1 for first in firsts)
    assert abs(due - len(tcp) * window / interval) <= 0.05 * 500  # the window was ~2 s
    achieved = sum(len(recorder.results[c.name]) for c in tcp)
    assert abs(achieved - due) <= 0.03 * due, (achieved, due)
    for c in tcp:
        times = recorder.times(c.name)
        assert slots(times, interval) == list(range(len(times))), c.name  # no slot missed
    worst = max(grid_error(recorder.times(c.name), interval) for c in tcp)
    assert worst < 0.05, f"a TCP component drifted {worst * 1000:.0f} ms off its grid"
    assert all(r.status == "HEALTHY" for c in tcp for _, r in recorder.results[c.name])

    slow_times = recorder.times("slow")
    assert len(slow_times) >= 9
    assert grid_error(slow_times, interval) < 0.05
    assert all(r.response_time_ms >= 100 for _, r in recorder.results["slow"])

    hung = [r for _, r in recorder.results["hanging"]]
    assert hung and all(r.error == "timed out after 0.2 s" for r in hung)
    assert scheduler.checks >= achieved + len(slow_times) + len(hung)


async def test_a_busy_slot_is_skipped_and_counted(tcp_port: int) -> None:
    """While a check (here its result handler) still runs at the next slot, that slot is
    skipped and counted; later checks stay on the original grid."""
    interval = 0.1
    recorder = Recorder()

    async def slow_first(component: Component, result: CheckResult, checked_at: float) -> None:
        await recorder(component, result, checked_at)
        if len(recorder.results[component.name]) == 1:
            await asyncio.sleep(2.5 * interval)  # busy through the next two slots

    config = InfraConfig(components=(component("busy", "tcp", tcp_port, interval),))
    scheduler = CheckScheduler(config, slow_first, rng=NoJitter())
    await run_for(scheduler, 6.6 * interval)  # slots 0..6

    times = recorder.times("busy")
    assert slots(times, interval) == [0, 3, 4, 5, 6]
    assert grid_error(times, interval) < 0.03
    assert scheduler.skipped == 2
    assert scheduler.stats()["busy"].skipped == 2


async def test_replace_keeps_unchanged_schedules(tcp_port: int) -> None:
    """After replace(): an unchanged component keeps its grid and counts, a changed one is
    checked with its new settings, a new one starts and a removed one stops."""
    interval = 0.1
    keep = component("keep", "tcp", tcp_port, interval)
    change = component("change", "tcp", tcp_port, interval)
    gone = component("gone", "tcp", tcp_port, interval)
    recorder = Recorder()
    scheduler = CheckScheduler(InfraConfig(components=(keep, change, gone)), recorder)
    await scheduler.start()
    try:
        await asyncio.sleep(4.5 * interval)
        before = scheduler.stats()["keep"].checks
        changed = component("change", "tcp", tcp_port, interval, timeout=interval / 2)
        added = component("added", "tcp", tcp_port, interval)
        await scheduler.replace(InfraConfig(components=(keep, changed, added)))
        replaced_at = time.time()
        await asyncio.sleep(4.5 * interval)
    finally:
        await scheduler.stop()

    assert set(scheduler.stats()) == {"keep", "change", "added"}
    keep_times = recorder.times("keep")
    assert grid_error(keep_times, interval) < 0.03  # one grid across the replace
    assert scheduler.stats()["keep"].checks == len(keep_times) > before >= 3
    assert all(t < replaced_at for t in recorder.times("gone"))
    after = [c for c, t in zip(recorder.components["change"], recorder.times("change"), strict=True)
             if t > replaced_at]  # fmt: skip
    assert after and all(c.health_check.timeout == interval / 2 for c in after)
    assert len(recorder.results["added"]) >= 3


async def test_stop_is_bounded_and_ends_the_callbacks() -> None:
    """stop() cancels a check stuck on a silent server at once (not after its 5 s timeout)
    and no result arrives afterwards."""
    recorder = Recorder()
    async with serve_http(Reply(hang=True)) as server:
        stuck = component("stuck", "http", server.port, 10.0, timeout=5.0)
        scheduler = CheckScheduler(InfraConfig(components=(stuck,)), recorder, rng=NoJitter())
        await scheduler.start()
        await asyncio.wait_for(server.requested.wait(), 5)  # the check is under way
        started = time.perf_counter()
        await scheduler.stop()
        assert time.perf_counter() - started < 1.5
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
    with capture_logs() as logs:
        await run_for(CheckScheduler(config, explode), 0.3)
    assert calls >= 4
    failures = [e for e in logs if e["event"] == "infra.on_result_failed"]
    assert len(failures) == calls and failures[0]["component"] == "c"
