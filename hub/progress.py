"""Read-your-writes: which ingress sequence each view reflects.

The ingest loop reports, per appended batch, the highest ingress sequence it
covers and the log positions written so far; each projector reports the
positions it has applied. A query carrying ``min_seq`` waits until its view
covers the positions recorded for the first batch that reached ``min_seq``.

Queries are answered by query-server processes (``hub.query_server``), so the
hub sends its progress to them (``ProgressFeed``) and each keeps a replica
(``ProgressFollower``). The feed, on core NATS:

* ``hub._internal.progress``: published by the writer hub, coalesced: at most every
  ``FEED_MIN_INTERVAL_S`` (20 ms) while something changes, and at least every
  ``FEED_MAX_INTERVAL_S`` (1 s) when idle. One JSON ``ProgressUpdate``: the hub's
  id, the new ``(ingress seq, positions)`` entries since the previous update (in
  order; the latest one again when there is none new, so a replica that missed the
  others catches up with an idle hub), each view's applied positions, the hub's
  status snapshot (``hub.query.status``) and the note query replies carry while the
  log stalls.
* ``hub._internal.progress.history``: request-reply; the hub answers with the same
  update, its entries being the recent history (as many as fit a message). A query
  server asks once when it starts, so that a ``min_seq`` written before it joined is
  answered as precisely as a later one.

An entry says "all ingress up to ``seq`` is in the log up to ``positions``". A lost
update, or a history that did not come, only makes a replica conservative: a
``min_seq`` then waits for the next entry it knows, whose positions are further
on, never for less than it needs.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from events.log import Positions, covers, merge_max

log = structlog.get_logger(__name__)

FEED_SUBJECT = "hub._internal.progress"
HISTORY_SUBJECT = "hub._internal.progress.history"
FEED_MIN_INTERVAL_S = 0.02
FEED_MAX_INTERVAL_S = 1.0
FEED_MAX_ENTRIES = 2000  # per live update (older ones are dropped: later entries cover them)
HISTORY_MAX_ENTRIES = 5000

Entry = tuple[int, Positions]


class Progress:
    """In-process tracker of ingest and projection progress."""

    def __init__(self, *, history: int = 20_000) -> None:
        self.ingested_seq = 0
        self._history = history
        self._seqs: deque[int] = deque(maxlen=history)
        self._positions: deque[Positions] = deque(maxlen=history)
        self._appended: Positions = {}
        self.views: dict[str, Positions] = {}
        self._changed = asyncio.Condition()
        self._listeners: list[Callable[[], None]] = []

    def listen(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (synchronously) after every change."""
        self._listeners.append(listener)

    async def _notify(self) -> None:
        for listener in self._listeners:
            listener()
        async with self._changed:
            self._changed.notify_all()

    async def appended(self, ingress_seq: int, positions: Positions) -> None:
        """All ingress up to ``ingress_seq`` is in the log, up to ``positions``."""
        merge_max(self._appended, positions)
        if ingress_seq > self.ingested_seq:
            self.ingested_seq = ingress_seq
            self._seqs.append(ingress_seq)
            self._positions.append(dict(self._appended))
        await self._notify()

    async def applied(self, view: str, positions: Positions) -> None:
        self.views[view] = dict(positions)
        await self._notify()

    def entries_after(self, seq: int) -> list[Entry]:
        """The recorded ``(ingress seq, positions)`` entries past ``seq``, in order."""
        i = bisect.bisect_right(self._seqs, seq)
        return [(self._seqs[k], self._positions[k]) for k in range(i, len(self._seqs))]

    async def replicate(
        self, entries: Sequence[Entry], views: Mapping[str, Positions] | None = None
    ) -> None:
        """A replica's update (from ``ProgressFeed``): entries as ``appended`` records
        them, and each view's applied positions (replacing what was known: a view that is
        rebuilt goes back). Entries older than the newest known (a history that arrives
        after live updates) are merged in order."""
        late: list[Entry] = []
        for seq, positions in entries:
            merge_max(self._appended, positions)
            if seq > self.ingested_seq:
                self.ingested_seq = seq
                self._seqs.append(seq)
                self._positions.append(dict(positions))
            elif seq < self.ingested_seq:
                late.append((seq, positions))
            # (the latest entry again, as an idle hub sends it: known already)
        if late:
            merged = dict(zip(self._seqs, self._positions, strict=True))
            for seq, positions in late:
                merged.setdefault(seq, dict(positions))
            ordered = sorted(merged.items())[-self._history :]
            self._seqs = deque((s for s, _ in ordered), maxlen=self._history)
            self._positions = deque((p for _, p in ordered), maxlen=self._history)
        for view, positions in (views or {}).items():
            self.views[view] = dict(positions)
        await self._notify()

    def up_to_date(self, view: str) -> bool:
        """Whether ``view`` has applied everything appended so far (positions of records
        actually written, so Kafka's transaction markers do not count)."""
        return covers(self.views.get(view, {}), self._appended)

    def lag(self, view: str) -> int:
        """How many records ``view`` is behind what was appended (summed over partitions)."""
        applied = self.views.get(view, {})
        return sum(max(0, end - applied.get(p, 0)) for p, end in self._appended.items())

    def needed(self, min_seq: int) -> Positions | None:
        """The log positions a view must reach to reflect ``min_seq``; None if not ingested."""
        if min_seq > self.ingested_seq:
            return None
        i = bisect.bisect_left(self._seqs, min_seq)
        if i >= len(self._seqs):
            return None
        return self._positions[i]

    def reflects(self, view: str, min_seq: int) -> bool:
        need = self.needed(min_seq)
        return need is not None and covers(self.views.get(view, {}), need)

    async def reported(self, views: list[str], timeout: float) -> bool:
        """Wait until each of ``views`` has reported what it applied (its projector has
        attached to it); False after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: all(v in self.views for v in views))
            return True
        except TimeoutError:
            return False

    async def wait(self, view: str, min_seq: int, timeout: float) -> bool:
        """Wait until ``view`` reflects ``min_seq``; False after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self.reflects(view, min_seq))
            return True
        except TimeoutError:
            return False


# --- the feed -----------------------------------------------------------------------------


class ProgressUpdate(msgspec.Struct, omit_defaults=True):
    """One message of the feed (see the module docstring)."""

    hub: str
    entries: list[tuple[int, dict[int, int]]] = []
    views: dict[str, dict[int, int]] = {}
    status: dict[str, Any] = {}
    degraded: str | None = None


_encode = msgspec.json.Encoder().encode
_decode_update = msgspec.json.Decoder(ProgressUpdate).decode


class ProgressFeed:
    """The hub's side: publishes its ``Progress`` (and status) for the query servers, and
    answers their requests for the recent history."""

    def __init__(
        self,
        progress: Progress,
        *,
        hub_id: str,
        status: Callable[[], dict[str, Any]],
        degraded: Callable[[], str | None] = lambda: None,
        min_interval_s: float = FEED_MIN_INTERVAL_S,
        max_interval_s: float = FEED_MAX_INTERVAL_S,
    ) -> None:
        self._progress = progress
        self.hub_id = hub_id
        self._status = status
        self._degraded = degraded
        self.min_interval_s = min_interval_s
        self.max_interval_s = max_interval_s
        self._nc: Client | None = None
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()
        self._sent_seq = 0  # entries up to this one have been published
        self.published = 0
        progress.listen(self._dirty.set)

    async def start(self, nc: Client) -> None:
        self._nc = nc
        self._sub = await nc.subscribe(HISTORY_SUBJECT, cb=self._on_history)
        await nc.flush()
        self._task = asyncio.create_task(self._run(), name="progress-feed")

    def update(self, entries: list[Entry]) -> ProgressUpdate:
        return ProgressUpdate(
            hub=self.hub_id, entries=entries, views=dict(self._progress.views),
            status=self._status(), degraded=self._degraded(),
        )  # fmt: skip

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.max_interval_s)
            self._dirty.clear()
            try:
                await self.publish()
            except Exception as exc:  # best effort: the next one carries everything again
                log.info("progress_feed_publish_failed", error=repr(exc))
            await asyncio.sleep(self.min_interval_s)

    async def publish(self) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return
        entries = self._progress.entries_after(self._sent_seq)[-FEED_MAX_ENTRIES:]
        if not entries:  # the latest again: one who missed it learns it from an idle hub
            entries = self._progress.entries_after(self._progress.ingested_seq - 1)[-1:]
        self._sent_seq = self._progress.ingested_seq
        await nc.publish(FEED_SUBJECT, _encode(self.update(entries)))
        self.published += 1

    async def _on_history(self, msg: Msg) -> None:
        if not msg.reply or self._nc is None:
            return
        entries = self._progress.entries_after(0)[-HISTORY_MAX_ENTRIES:]
        limit = self._nc.max_payload - 1024
        while True:
            data = _encode(self.update(entries))
            if len(data) <= limit or len(entries) <= 1:
                break
            entries = entries[len(entries) // 2 :]  # the most recent half
        try:
            await msg.respond(data)
        except Exception as exc:
            log.info("progress_history_reply_failed", error=repr(exc))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


class ProgressFollower:
    """A query server's side: keeps a replica ``Progress`` and the hub's latest status
    from the feed.

    Attributes:
        hub: the id of the hub last heard from (None: none yet).
        status: the hub's status snapshot, as last received.
        degraded: the note the hub puts on query replies (None: none).
    """

    def __init__(
        self, progress: Progress, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.progress = progress
        self._monotonic = monotonic
        self.started_at = monotonic()
        self.heard_at: float | None = None
        self.hub: str | None = None
        self.status: dict[str, Any] = {}
        self.degraded: str | None = None
        self.updates = 0
        self._live = False  # a live update was applied (the views it carried are newer)
        self._sub: Subscription | None = None

    async def start(self, nc: Client, *, history_timeout: float = 2.0) -> bool:
        """Follow the feed, then ask the hub for its recent history (subscribed first, so
        nothing falls in between). True if the history came."""
        self._sub = await nc.subscribe(FEED_SUBJECT, cb=self._on_update)
        try:
            reply = await nc.request(HISTORY_SUBJECT, b"", timeout=history_timeout)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            log.info("progress_history_unavailable", error=type(exc).__name__)
            return False
        await self.apply(_decode_update(reply.data), live=False)
        return True

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_update(self, msg: Msg) -> None:
        try:
            update = _decode_update(msg.data)
        except msgspec.DecodeError as exc:  # not the hub's (anyone may publish there)
            log.warning("progress_update_unreadable", error=str(exc))
            return
        await self.apply(update, live=True)

    async def apply(self, update: ProgressUpdate, *, live: bool) -> None:
        """Take an update in; a history (``live=False``) adds its entries, and its views
        and status only if no live update came before it."""
        newer = live or not self._live
        self._live = self._live or live
        self.heard_at = self._monotonic()
        self.hub = update.hub
        self.updates += 1
        if newer:
            self.status = update.status
            self.degraded = update.degraded
        await self.progress.replicate(update.entries, update.views if newer else None)

    def silent_s(self) -> float:
        """Seconds since the hub was last heard from (since the start if never)."""
        return self._monotonic() - (self.heard_at if self.heard_at is not None else self.started_at)
