"""``hub replay`` and ``hub verify``: rebuild the views from the log; check them against it.

Replay folds the whole log (Kafka by default, JetStream when that is the
configured log) with the pure fold, writes the result into shadow tables/keys,
checks the shadow equals the fold, and swaps it in atomically with the
checkpoint; live queries keep reading the old view until the swap. A running
hub's projectors then continue from the new checkpoint.

Verify reads each view with its checkpoint in one snapshot, folds the log up to
exactly that checkpoint, and compares canonical renderings (and their SHA-256).
On a live hub the log keeps moving past that checkpoint and drops what it
supersedes (each instance's earlier heartbeats, each component's earlier check
results), so an instance or component with a newer record past the checkpoint is
compared without those fields. A view without a checkpoint over a log that is not
empty is reported: it has lost what it held (its projector rebuilds it).

The running hub's projectors heal their views the same way (``hub.projector``):
``fold_log`` then ``rebuild``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis

from events.log import Positions, advance, merge_max
from events.model import superseded_subject
from hub import bootstrap
from hub.config import HubConfig
from hub.eventlog.port import EventLog
from hub.gcpause import gc_paused
from hub.natsconn import HubClient
from projections.canonical import checksum, differences
from projections.fold import ViewState
from projections.port import Projection

VIEWS = ("postgres", "redis")


class ProgressBar:
    """Events done / total, rate and ETA: a bar on a terminal, log lines otherwise."""

    def __init__(self, total: int, *, out=sys.stderr, every_s: float = 2.0) -> None:  # type: ignore[no-untyped-def]
        self.total = max(total, 0)
        self.done = 0
        self._out = out
        self._tty = bool(getattr(out, "isatty", lambda: False)())
        self._start = time.monotonic()
        self._last = 0.0
        self._every = 0.1 if self._tty else every_s

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0)
        eta = f"{left / rate:5.0f}s" if rate > 0 and self.total else "    ?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        if self._tty:
            width = 30
            fill = int(width * min(pct, 100) / 100)
            bar = "#" * fill + "-" * (width - fill)
            return (f"\rreplay [{bar}] {self.done}/{self.total} events "
                    f"{rate:,.0f}/s ETA {eta}")  # fmt: skip
        return f"replay: {self.done}/{self.total} events ({pct:.0f}%), {rate:,.0f}/s, ETA {eta}\n"

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            self._out.write(self.line())
            self._out.flush()

    def finish(self) -> None:
        self._out.write(self.line() + ("\n" if self._tty else ""))
        self._out.flush()


async def fold_log(
    event_log: EventLog,
    *,
    until: Positions | None = None,
    on_batch: Callable[[int], None] | None = None,
    moved: set[str] | None = None,
    ends: Positions | None = None,
) -> tuple[ViewState, Positions]:
    """The pure fold of the log (up to ``until`` if given) and the positions it covers.

    ``moved`` (with ``until``) collects what has a volatile record past ``until``, whose
    earlier one (before ``until``) may have been superseded and removed
    (``events.model.superseded_subject``): instances with a heartbeat (row ids
    ``tenant/service/instance``) and infrastructure components with a check result
    (``_infra/<name>``), as the views' ``Rendering.volatile_of`` names them.
    ``ends`` gets the positions after every record read, ``until`` or not.
    """
    view = ViewState()
    positions: Positions = {}
    with gc_paused():
        async for records in event_log.read(None, follow=False, batch=5000):
            if ends is not None:
                merge_max(ends, advance({}, records))
            if until is not None:
                if moved is not None:
                    for r in records:
                        if r.position < until.get(r.partition, 0):
                            continue
                        subject = superseded_subject(r.event)
                        if subject is not None:
                            moved.add(subject)
                records = [r for r in records if r.position < until.get(r.partition, 0)]
            for r in records:
                view.apply(r.event)
            positions = advance(positions, records)
            if on_batch is not None:
                on_batch(len(records))
    return view, positions


@dataclass
class Connections:
    """What replay and verify talk to."""

    config: HubConfig
    event_log: EventLog
    pool: asyncpg.Pool
    redis: aioredis.Redis
    nc: HubClient | None = None
    views: dict[str, Projection] = field(default_factory=dict)

    @classmethod
    async def open(cls, config: HubConfig) -> Connections:
        """Connect, built as the hub builds them (``hub.bootstrap``): the log read-only,
        the views with the hub's settings."""
        nc = await bootstrap.log_nats(config, "central-hub-replay")
        event_log = bootstrap.make_event_log(config, nc, read_only=True)
        await event_log.start()
        pool = await bootstrap.connect_postgres(config)
        r = bootstrap.redis_client(config)
        pg_view = bootstrap.postgres_projection(config, pool)
        await pg_view.setup()
        views: dict[str, Projection] = {
            "postgres": pg_view, "redis": bootstrap.redis_projection(config, r),
        }  # fmt: skip
        return cls(config, event_log, pool, r, nc, views)

    async def close(self) -> None:
        await self.event_log.close()
        await self.pool.close()
        await self.redis.aclose()
        if self.nc is not None:
            await self.nc.close()


async def replay(conn: Connections, views: tuple[str, ...] = VIEWS, *, out=sys.stderr) -> Positions:  # type: ignore[no-untyped-def]
    """Rebuild ``views`` from the start of the log; returns the positions replayed to."""
    end = await conn.event_log.end_positions()
    bar = ProgressBar(sum(end.values()), out=out)
    view, positions = await fold_log(conn.event_log, on_batch=bar.advance)
    bar.finish()
    # The two views are independent servers: rebuild them concurrently.
    await asyncio.gather(*(conn.views[name].rebuild(view, positions) for name in views))
    return positions


@dataclass
class ViewReport:
    """One view against the fold of the log up to its checkpoint.

    ``moving``: rows/keys that differ only in volatile fields (an instance's heartbeat
    fields, a component's last check) whose record the log has since replaced with a
    newer one past the checkpoint (live traffic during verify); they are not errors,
    but the checksums then differ.
    """

    name: str
    checkpoint: Positions
    view_checksum: str
    log_checksum: str
    problems: list[str]
    moving: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and (bool(self.moving) or self.view_checksum == self.log_checksum)


async def verify(conn: Connections, views: tuple[str, ...] = VIEWS) -> list[ViewReport]:
    """Compare each view with the fold of the log up to that view's checkpoint."""
    reports = []
    for name in views:
        projection = conn.views[name]
        checkpoint, actual = await projection.snapshot()
        moved: set[str] = set()
        ends: Positions = {}
        view, _ = await fold_log(conn.event_log, until=checkpoint, moved=moved, ends=ends)
        rendering = projection.rendering
        expected = rendering.expected(view)
        moving = [
            key for key in set(expected) & set(actual)
            if expected[key] != actual[key] and rendering.volatile_of(key) in moved
            and rendering.without_volatile(expected[key]) == rendering.without_volatile(actual[key])
        ]  # fmt: skip
        exempt = {k: actual[k] for k in moving}
        problems = differences({**expected, **exempt}, actual)
        if not checkpoint and ends:
            problems.insert(
                0,
                "no checkpoint: the view has applied nothing of a log that "
                f"holds records up to {ends} (lost? its projector rebuilds it)",
            )
        reports.append(ViewReport(name, checkpoint, checksum(actual), checksum(expected),
                                  problems, sorted(moving)))  # fmt: skip
    return reports
