"""Runs a projection: follow the event log from the view's checkpoint, apply batches.

A view can be lost behind its projector's back: a Redis-protocol server that
restarts without persistence (or is flushed), PostgreSQL tables truncated or
restored from an older copy, ``hub replay`` swapping in a view rebuilt up to an
earlier point than the projector had reached. The projector notices — at its next
batch (the view's checkpoint is missing or behind what it applied: the batch is not
written over the hole) or at its check every ``VIEW_CHECK_S`` — logs it
(``view_lost_rebuilding``), counts it (``view_lost:<view>``), marks the view
REBUILDING for its readers, and rebuilds it from the log the way ``hub replay`` does
(``fold_log``, then ``rebuild``: written aside, checked, swapped in with its
checkpoint; READY again), then goes on from there (``view_rebuilds:<view>``).

A view that has no checkpoint when its projector starts, over a log that is not
empty (new, or lost while no projector ran), is built by reading the log from its
start (``view_building_from_log``, ``view_built:<view>``), REBUILDING for its readers
until it has caught up: so the hub's appends made meanwhile still reach it whole
from the tail, as with any projector that starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Protocol

import structlog

from events.log import LogRecord, Positions, covers
from hub.eventlog.port import EventLog
from hub.metrics import Metrics
from hub.replay import fold_log
from hub.tail import LogTail, TailOverflow, TailSubscription
from projections.port import READY, REBUILDING, Projection, ViewLost

log = structlog.get_logger(__name__)

# How often a projector checks that its view still holds what it wrote (a few cheap
# reads), besides the check every batch makes.
VIEW_CHECK_S = 1.0


class AppliedSink(Protocol):
    """Where a projector reports the positions it has applied (``hub.progress.Progress``,
    or the report back to the hub from ``hub.views_process``)."""

    async def applied(self, view: str, positions: Positions) -> None: ...


async def log_has_records(event_log: EventLog) -> bool:
    """Whether the log holds any record (reads at most its first batch)."""
    batches = event_log.read(None, follow=False, batch=1)
    try:
        async for records in batches:
            if records:
                return True
        return False
    finally:
        close = getattr(batches, "aclose", None)  # an async generator: end its reader now
        if close is not None:
            await close()


async def rebuild_view(event_log: EventLog, projection: Projection, reason: str) -> Positions:
    """Rebuild ``projection``'s view from the whole log (REBUILDING meanwhile); returns
    the positions it now holds."""
    await projection.mark(REBUILDING, reason)
    view, positions = await fold_log(event_log)
    await projection.rebuild(view, positions)
    return positions


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
    a failed read restarts from the view's checkpoint; a lost view is rebuilt from the
    log (see the module's docstring). Ends when ``stop`` is set: a cancellation alone
    can be lost inside the NATS client (``wait_for`` on Python 3.11 returns a message
    that arrived as it was cancelled), so the loop also checks.
    """
    stop = stop or asyncio.Event()
    delay = 0.1
    name = projection.name

    async def apply(records: Sequence[LogRecord]) -> Positions:
        nonlocal delay
        while True:
            try:
                applied = await projection.apply(records)
                break
            except (OSError, ConnectionError, TimeoutError) as exc:
                log.warning("projection_apply_failed", view=name, error=repr(exc))
                metrics.inc(f"projection_retries:{name}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        delay = 0.1
        metrics.inc(f"projected:{name}", len(records))
        await progress.applied(name, applied)
        return applied

    async def examine() -> None:
        for notice in await projection.examine():
            log.warning("view_notice", view=name, notice=notice)
            metrics.inc(f"view_notices:{name}")

    building = False  # from the start of the log, not yet caught up (REBUILDING)
    while not stop.is_set():
        sub: TailSubscription | None = tail.subscribe() if tail is not None else None
        try:
            await projection.warm()
            applied = await projection.attach()
            if not applied and await log_has_records(event_log):
                building = True
                log.warning("view_building_from_log", view=name)
                metrics.inc(f"view_built:{name}")
                await projection.mark(REBUILDING, "no checkpoint: being built from the log")
            if sub is None or not building:
                await projection.mark(READY)
            await progress.applied(name, applied)
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
            if building:  # caught up
                await projection.mark(READY)
                building = False
            metrics.inc(f"projection_tail_joined:{name}")
            checked = time.monotonic()
            while not stop.is_set():
                records = await sub.get(batch, timeout=0.5)
                if records:
                    applied = await apply(records)
                if time.monotonic() - checked >= VIEW_CHECK_S:
                    await examine()
                    checked = time.monotonic()
        except asyncio.CancelledError:
            raise
        except ViewLost as exc:
            if stop.is_set():
                return
            if sub is not None:
                sub.close()  # what is appended meanwhile is read from the log afterwards
            log.error("view_lost_rebuilding", view=name, reason=str(exc))
            metrics.inc(f"view_lost:{name}")
            try:
                positions = await rebuild_view(event_log, projection, str(exc))
            except asyncio.CancelledError:
                raise
            except Exception as failed:  # next turn: attach finds it still lost, again
                log.error("view_rebuild_failed", view=name, error=repr(failed))
                metrics.inc(f"projection_restarts:{name}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                building = False
                log.warning("view_rebuilt", view=name, positions=positions)
                metrics.inc(f"view_rebuilds:{name}")
        except TailOverflow:
            log.info("projection_fell_behind_reading_log", view=name)
            metrics.inc(f"projection_tail_overflows:{name}")
        except Exception as exc:
            if stop.is_set():
                return
            log.error("projection_failed_restarting", view=name, error=repr(exc))
            metrics.inc(f"projection_restarts:{name}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        finally:
            if sub is not None:
                sub.close()
