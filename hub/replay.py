"""``hub replay`` and ``hub verify``: rebuild the views from the log; check them against it.

Replay folds the whole log (Kafka by default, JetStream when that is the
configured log) with the pure fold, writes the result into shadow tables/keys,
checks the shadow equals the fold, and swaps it in atomically with the
checkpoint; live queries keep reading the old view until the swap. A running
hub's projectors then continue from the new checkpoint.

Verify reads each view with its checkpoint in one snapshot, folds the log up to
exactly that checkpoint, and compares canonical renderings (and their SHA-256).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis

from events.log import Positions, advance
from hub.app import connect_postgres, make_event_log
from hub.config import HubConfig
from hub.eventlog.port import EventLog
from hub.gcpause import gc_paused
from projections.postgres import PostgresRegistryProjection
from projections.redis import RedisRegistryProjection
from projections.render import (
    ViewState,
    canonical_redis,
    checksum,
    differences,
    expected_pg,
    expected_redis,
)

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
) -> tuple[ViewState, Positions]:
    """The pure fold of the log (up to ``until`` if given) and the positions it covers."""
    view = ViewState()
    positions: Positions = {}
    with gc_paused():
        async for records in event_log.read(None, follow=False, batch=5000):
            if until is not None:
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
    nc: object | None = None
    views: dict[str, PostgresRegistryProjection | RedisRegistryProjection] = field(
        default_factory=dict
    )

    @classmethod
    async def open(cls, config: HubConfig) -> Connections:
        import nats

        nc = (
            await nats.connect(servers=list(config.nats_urls))
            if config.event_log != "kafka"
            else None
        )
        event_log = make_event_log(config, nc, read_only=True)
        await event_log.start()
        pool = await connect_postgres(config)
        r = aioredis.Redis(host=config.redis_host, port=config.redis_port,
                           password=config.redis_password or None, db=config.redis_db,
                           decode_responses=True)  # fmt: skip
        pg_view = PostgresRegistryProjection(pool)
        await pg_view.setup()
        return cls(config, event_log, pool, r, nc,
                   {"postgres": pg_view, "redis": RedisRegistryProjection(r)})  # fmt: skip

    async def close(self) -> None:
        await self.event_log.close()
        await self.pool.close()
        await self.redis.aclose()
        if self.nc is not None:
            await self.nc.close()  # type: ignore[attr-defined]


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
    name: str
    checkpoint: Positions
    view_checksum: str
    log_checksum: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return self.view_checksum == self.log_checksum and not self.problems


async def verify(conn: Connections, views: tuple[str, ...] = VIEWS) -> list[ViewReport]:
    """Compare each view with the fold of the log up to that view's checkpoint."""
    reports = []
    for name in views:
        checkpoint, actual = await conn.views[name].snapshot()
        view, _ = await fold_log(conn.event_log, until=checkpoint)
        if name == "postgres":
            expected = expected_pg(view)
        else:
            expected = {k: canonical_redis(k, v) for k, v in expected_redis(view).items()}
        reports.append(ViewReport(name, checkpoint, checksum(actual), checksum(expected),
                                  differences(expected, actual)))  # fmt: skip
    return reports
