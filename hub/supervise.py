"""Restarting a failed internal task, within a restart intensity (as Erlang/OTP does).

A task that fails is restarted after a backoff (0.5 s doubling to 30 s), first
running its ``recover`` step (e.g. the ingest loop folds its state from the log
again). More than ``max_restarts`` failures within ``period_s`` mean the failure
is not transient: :class:`GaveUp` is raised and the hub exits non-zero, so its
own supervisor (systemd, compose, ``hub dev``) restarts the process.

The rule is OTP's restart intensity over a sliding period, which the retry
libraries (tenacity, backoff) do not model: they count attempts per call, while
a task that ran well for an hour and then failed is a fresh failure here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable

import structlog

from hub.writer import Fenced

log = structlog.get_logger(__name__)


class GaveUp(Exception):
    """A task failed more often than its restart intensity allows."""

    def __init__(self, task: str, failures: int, period_s: float, error: BaseException) -> None:
        super().__init__(
            f"{task} failed {failures} times within {period_s:g} s; last error: {error!r}"
        )
        self.task = task


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    stop: asyncio.Event,
    recover: Callable[[], Awaitable[None]] | None = None,
    on_failure: Callable[[str, BaseException], None] | None = None,
    max_restarts: int = 5,
    period_s: float = 300.0,
    first_delay: float = 0.5,
    max_delay: float = 30.0,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Run ``run()`` until it returns or ``stop`` is set, restarting it when it fails.

    Raises:
        Fenced: not retried (this hub must stop).
        GaveUp: more than ``max_restarts`` failures within ``period_s``.
    """
    failures: deque[float] = deque()
    delay = first_delay

    def failed(stage: str, exc: Exception, ran_s: float) -> None:
        nonlocal delay
        now = monotonic()
        failures.append(now)
        while failures and failures[0] < now - period_s:
            failures.popleft()
        if on_failure is not None:
            on_failure(name, exc)
        if len(failures) > max_restarts:
            log.error("hub_task_gave_up", task=name, failures=len(failures),
                      period_s=period_s, error=repr(exc))  # fmt: skip
            raise GaveUp(name, len(failures), period_s, exc) from exc
        if ran_s > period_s:  # it had run well for long: a fresh failure
            delay = first_delay
        log.error("hub_task_failed_restarting", task=name, stage=stage, error=repr(exc),
                  restart_in_s=delay, failures=len(failures), exc_info=exc)  # fmt: skip

    while True:
        started = monotonic()
        try:
            await run()
            return
        except (Fenced, asyncio.CancelledError):
            raise
        except Exception as exc:
            if stop.is_set():
                return
            failed("run", exc, monotonic() - started)
        while True:  # back off, then recover (retried like the task itself)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            delay = min(delay * 2, max_delay)
            if recover is None:
                break
            try:
                await recover()
                break
            except (Fenced, asyncio.CancelledError):
                raise
            except Exception as exc:
                failed("recover", exc, 0.0)
