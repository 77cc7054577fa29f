"""Restarting a failed task within a restart intensity (hub.supervise), without servers."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from hub.supervise import GaveUp, supervise
from hub.writer import Fenced

FAST = {"first_delay": 0.001, "max_delay": 0.002}


async def test_a_failing_task_is_recovered_and_restarted_until_it_succeeds():
    """Each failure is followed by ``recover`` and another run; a run that returns ends it."""
    runs: list[str] = []
    failures: list[str] = []

    async def run() -> None:
        runs.append("run")
        if runs.count("run") < 3:
            raise RuntimeError(f"failure {runs.count('run')}")

    async def recover() -> None:
        runs.append("recover")

    await supervise("t", run, stop=asyncio.Event(), recover=recover,
                    on_failure=lambda name, exc: failures.append(str(exc)), **FAST)  # fmt: skip
    assert runs == ["run", "recover", "run", "recover", "run"]
    assert failures == ["failure 1", "failure 2"]


async def test_more_failures_than_the_intensity_allows_give_up():
    """More than ``max_restarts`` failures within the period raise GaveUp naming the task."""
    calls = 0

    async def run() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("always")

    with pytest.raises(GaveUp, match="ingest failed 4 times"):
        await supervise("ingest", run, stop=asyncio.Event(), max_restarts=3, **FAST)
    assert calls == 4


async def test_failures_spread_beyond_the_period_do_not_add_up():
    """Only failures within ``period_s`` of each other count (a sliding period)."""
    clock = itertools.count(0, 100)  # every reading 100 "seconds" after the previous one
    calls = 0

    async def run() -> None:
        nonlocal calls
        calls += 1
        if calls < 6:
            raise ValueError("now and then")

    await supervise("t", run, stop=asyncio.Event(), max_restarts=1, period_s=150,
                    monotonic=lambda: float(next(clock)), **FAST)  # fmt: skip
    assert calls == 6


async def test_fenced_is_not_retried_and_a_failing_recover_counts():
    """Fenced ends supervision at once; a recover step that fails counts as a failure."""

    async def fenced() -> None:
        raise Fenced("another hub")

    with pytest.raises(Fenced):
        await supervise("t", fenced, stop=asyncio.Event(), **FAST)

    async def failing() -> None:
        raise RuntimeError("run")

    async def bad_recover() -> None:
        raise RuntimeError("recover")

    with pytest.raises(GaveUp):
        await supervise("t", failing, stop=asyncio.Event(), recover=bad_recover,
                        max_restarts=2, **FAST)  # fmt: skip


async def test_a_stop_during_the_backoff_ends_supervision_quietly():
    """Once the hub is stopping, a failure is not restarted."""
    stop = asyncio.Event()

    async def run() -> None:
        stop.set()
        raise RuntimeError("while stopping")

    await supervise("t", run, stop=stop, first_delay=10.0)
