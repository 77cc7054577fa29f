"""Runs a projection: follow the event log from the view's checkpoint, apply batches."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import structlog

from events.log import LogRecord, Positions, covers
from hub.eventlog.port import EventLog
from hub.metrics import Metrics
from hub.tail import LogTail, TailOverflow, TailSubscription
from projections.port import Projection

log = structlog.get_logger(__name__)


class AppliedSink(Protocol):
    """Where a projector reports the positions it has applied (``hub.progress.Progress``,
    or the report back to the hub from ``hub.views_process``)."""

    async def applied(self, view: str, positions: Positions) -> None: ...


async def run_projection(
    event_log: EventLog,
    projection: Projection,
    *,
    progress: AppliedSink,
    metrics: Metrics,
    batch: int = 2000,
    stop: asyncio.Event | None = None,
    tail: LogTail | None = None,
) -> None:
    """Apply the log to ``projection`` until ``stop``; failures are retried, never skipped.

    The projection reads the log from its checkpoint. With ``tail`` (the hub's own
    appends, see ``hub.tail``), once it has caught up it takes new records from the
    tail instead of reading them back, and returns to the log if it falls too far
    behind or anything fails.

    A failed ``apply`` is retried with the same records (the projection skips
    what its checkpoint covers, so a retry after a partial failure is safe);
    a failed read restarts from the view's checkpoint. Ends when ``stop`` is set: a
    cancellation alone can be lost inside the NATS client (``wait_for`` on Python 3.11
    returns a message that arrived as it was cancelled), so the loop also checks.
    """
    stop = stop or asyncio.Event()
    delay = 0.1

    async def apply(records: Sequence[LogRecord]) -> Positions:
        nonlocal delay
        while True:
            try:
                applied = await projection.apply(records)
                break
            except (OSError, ConnectionError, TimeoutError) as exc:
                log.warning("projection_apply_failed", view=projection.name, error=repr(exc))
                metrics.inc(f"projection_retries:{projection.name}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        delay = 0.1
        metrics.inc(f"projected:{projection.name}", len(records))
        await progress.applied(projection.name, applied)
        return applied

    while not stop.is_set():
        sub: TailSubscription | None = tail.subscribe() if tail is not None else None
        try:
            await projection.warm()
            applied = await projection.checkpoint()
            await progress.applied(projection.name, applied)
            if sub is None or not covers(applied, sub.start):
                async for records in event_log.read(applied, follow=True, batch=batch):
                    if stop.is_set():
                        return
                    applied = await apply(records)
                    if tail is not None and sub is not None:
                        if sub.overflowed:  # still reading the log: join later instead
                            sub = tail.subscribe()
                        if covers(applied, sub.start):
                            break
            if sub is None:
                continue  # the log's reader ended (it follows, so only on trouble)
            metrics.inc(f"projection_tail_joined:{projection.name}")
            while not stop.is_set():
                records = await sub.get(batch, timeout=0.5)
                if records:
                    applied = await apply(records)
        except asyncio.CancelledError:
            raise
        except TailOverflow:
            log.info("projection_fell_behind_reading_log", view=projection.name)
            metrics.inc(f"projection_tail_overflows:{projection.name}")
        except Exception as exc:
            if stop.is_set():
                return
            log.error("projection_failed_restarting", view=projection.name, error=repr(exc))
            metrics.inc(f"projection_restarts:{projection.name}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        finally:
            if sub is not None:
                sub.close()
