"""Runs a projection: follow the event log from the view's checkpoint, apply batches."""

from __future__ import annotations

import asyncio

import structlog

from hub.eventlog.port import EventLog
from hub.metrics import Metrics
from hub.progress import Progress
from projections.port import Projection

log = structlog.get_logger(__name__)


async def run_projection(
    event_log: EventLog,
    projection: Projection,
    *,
    progress: Progress,
    metrics: Metrics,
    batch: int = 2000,
    stop: asyncio.Event | None = None,
) -> None:
    """Apply the log to ``projection`` forever; failures are retried, never skipped.

    A failed ``apply`` is retried with the same records (the projection skips
    what its checkpoint covers, so a retry after a partial failure is safe);
    a failed read restarts from the view's checkpoint. Ends when ``stop`` is set: a
    cancellation alone can be lost inside the NATS client (``wait_for`` on Python 3.11
    returns a message that arrived as it was cancelled), so the loop also checks.
    """
    stop = stop or asyncio.Event()
    delay = 0.1
    while not stop.is_set():
        try:
            start = await projection.checkpoint()
            await progress.applied(projection.name, start)
            async for records in event_log.read(start, follow=True, batch=batch):
                if stop.is_set():
                    return
                while True:
                    try:
                        applied = await projection.apply(records)
                        break
                    except (OSError, ConnectionError, TimeoutError) as exc:
                        log.warning("projection_apply_failed", view=projection.name,
                                    error=repr(exc))  # fmt: skip
                        metrics.inc(f"projection_retries:{projection.name}")
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 5.0)
                delay = 0.1
                metrics.inc(f"projected:{projection.name}", len(records))
                await progress.applied(projection.name, applied)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if stop.is_set():
                return
            log.error("projection_failed_restarting", view=projection.name, error=repr(exc))
            metrics.inc(f"projection_restarts:{projection.name}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
