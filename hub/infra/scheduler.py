"""Running every component's check at its own interval, concurrently and without drift.

Each component has a ticker task that wakes at ``first + k * interval`` on the loop's
monotonic clock (so the time a check takes never shifts later checks), and starts the
check as a task of its own (so a slow or hanging component never delays another). A
check still running when its next slot comes makes the scheduler skip that slot rather
than pile up probes against a struggling server; skipped slots are counted. The first
slot of each component is at a random point of its first interval, so that components
loaded together do not probe in lockstep.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import structlog

from events.vocab import InfraStatus
from hub.infra.checkers import CLOSE_TIMEOUT_S, CheckResult, describe_error, preload, run_check
from hub.infra.config import Component, InfraConfig

log = structlog.get_logger(__name__)

OnResult = Callable[[Component, CheckResult, float], Awaitable[None]]
Check = Callable[[Component], Awaitable[CheckResult]]

# A check is given its timeout plus this before the scheduler gives up on it: run_check
# keeps to timeout + CLOSE_TIMEOUT_S itself; this only guards against other ``check``s.
_OVERRUN_GRACE_S = CLOSE_TIMEOUT_S + 1.0


@dataclass
class ComponentStats:
    """Counts for one component: checks that finished and slots skipped while one ran."""

    checks: int = 0
    skipped: int = 0


@dataclass(eq=False)
class _Schedule:
    component: Component
    stats: ComponentStats = field(default_factory=ComponentStats)
    ticker: asyncio.Task[None] | None = None
    running: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return self.running is not None and not self.running.done()

    def tasks(self) -> list[asyncio.Task[None]]:
        return [t for t in (self.ticker, self.running) if t is not None and not t.done()]


class CheckScheduler:
    """Checks every component of an :class:`InfraConfig` at its interval until stopped.

    ``on_result(component, result, checked_at)`` is awaited after each check, with
    ``checked_at`` the wall-clock time (``time.time()``) at which the check started. Its
    exceptions are logged and do not stop the schedule; the time it takes counts as the
    check's own, so a slow handler thins out the checks instead of piling them up.
    ``check`` defaults to
    :func:`~hub.infra.checkers.run_check`; ``rng`` makes the start jitter reproducible.
    """

    def __init__(
        self,
        config: InfraConfig,
        on_result: OnResult,
        *,
        check: Check = run_check,
        rng: random.Random | None = None,
        stop_timeout: float = 5.0,
    ) -> None:
        self._config = config
        self._on_result = on_result
        self._check = check
        self._rng = rng or random.Random()
        self._stop_timeout = stop_timeout
        self._schedules = {c.name: _Schedule(c) for c in config.components}
        self._started = False
        self.checks = 0  # checks completed, over the scheduler's life
        self.skipped = 0  # slots skipped because the previous check still ran

    @property
    def config(self) -> InfraConfig:
        return self._config

    @property
    def running(self) -> bool:
        return self._started

    def stats(self) -> dict[str, ComponentStats]:
        """A copy of the counts of each current component."""
        return {
            name: ComponentStats(s.stats.checks, s.stats.skipped)
            for name, s in self._schedules.items()
        }

    async def start(self) -> None:
        """Start every component's schedule (idempotent); returns once the schedules run."""
        if self._started:
            return
        await preload()
        if self._started:  # another start() finished while this one preloaded
            return
        self._started = True
        for schedule in self._schedules.values():
            self._start_ticker(schedule)
        log.info("infra.scheduler_started", components=len(self._schedules))

    async def stop(self) -> None:
        """Cancel all schedules and running checks; waits at most ``stop_timeout``."""
        self._started = False
        await self._cancel(self._schedules.values())
        log.info("infra.scheduler_stopped", checks=self.checks, skipped=self.skipped)

    async def replace(self, config: InfraConfig) -> None:
        """Swap in a new component set (e.g. after a reload on SIGHUP).

        Components that are unchanged keep their schedule (and counts); changed ones start
        a new schedule and new ones start; removed and changed ones stop, including a check
        of theirs that is still running.
        """
        keep: dict[str, _Schedule] = {}
        for component in config.components:
            current = self._schedules.get(component.name)
            if current is None or current.component != component:
                current = _Schedule(component)
            keep[component.name] = current
        retired = [s for name, s in self._schedules.items() if keep.get(name) is not s]
        self._config, self._schedules = config, keep
        if self._started:
            for schedule in keep.values():
                if schedule.ticker is None:
                    self._start_ticker(schedule)
        await self._cancel(retired)
        log.info(
            "infra.scheduler_replaced",
            components=len(keep),
            restarted_or_removed=sorted(s.component.name for s in retired),
        )

    # -- internals ------------------------------------------------------------------------

    def _start_ticker(self, schedule: _Schedule) -> None:
        interval = schedule.component.health_check.interval
        first_due = asyncio.get_running_loop().time() + self._rng.uniform(0.0, interval)
        schedule.ticker = asyncio.create_task(
            self._tick(schedule, first_due), name=f"infra-tick-{schedule.component.name}"
        )

    async def _tick(self, schedule: _Schedule, due: float) -> None:
        """Start a check at ``due``, ``due + interval``, ... (a slot is skipped while busy)."""
        loop = asyncio.get_running_loop()
        interval = schedule.component.health_check.interval
        name = schedule.component.name
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            if schedule.busy:
                self._skip(schedule, 1)
            else:
                schedule.running = asyncio.create_task(
                    self._run_one(schedule), name=f"infra-check-{name}"
                )
            due += interval
            late = loop.time() - due
            if late >= 0:  # the loop stalled over whole slots: skip them, keep the grid
                missed = int(late // interval) + 1
                self._skip(schedule, missed)
                due += missed * interval

    def _skip(self, schedule: _Schedule, slots: int) -> None:
        schedule.stats.skipped += slots
        self.skipped += slots
        log.debug("infra.check_skipped", component=schedule.component.name, slots=slots)

    async def _run_one(self, schedule: _Schedule) -> None:
        component = schedule.component
        checked_at = time.time()
        result = await self._bounded_check(component)
        schedule.stats.checks += 1
        self.checks += 1
        try:
            await self._on_result(component, result, checked_at)
        except Exception:
            log.exception("infra.on_result_failed", component=component.name)

    async def _bounded_check(self, component: Component) -> CheckResult:
        """``check(component)``, turned into UNHEALTHY if it raises or overruns its timeout."""
        timeout = component.health_check.timeout
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout + _OVERRUN_GRACE_S):
                return await self._check(component)
        except Exception as exc:
            return CheckResult(
                status=InfraStatus.UNHEALTHY,
                response_time_ms=(time.perf_counter() - started) * 1000.0,
                error=describe_error(exc, timeout),
            )

    async def _cancel(self, schedules: Iterable[_Schedule]) -> None:
        """Cancel the tickers and running checks of ``schedules``; wait, bounded."""
        schedules = list(schedules)
        tasks = [task for schedule in schedules for task in schedule.tasks()]
        for schedule in schedules:
            schedule.ticker = schedule.running = None
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self._stop_timeout)
        if pending:
            log.warning("infra.tasks_not_stopped", count=len(pending))
        for task in tasks:
            if task.done():
                with contextlib.suppress(asyncio.CancelledError):
                    task.exception()  # retrieved, so asyncio does not log it at exit
