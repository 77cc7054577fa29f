"""The log's live tail, in process: what the ingest loop appends, handed to the projectors.

The hub is the event log's single writer, so it knows every record it appended
and where (``EventLog.append`` returns them with their positions). A projector
that has caught up with the log takes the records from here instead of reading
them back from the log, which saves a log round trip and a decode per record per
view. The log stays the source of truth: a projector starts, and falls back
after any trouble, by reading the log from its own checkpoint.

Joining without a gap: a subscription buffers every batch appended after it was
made and remembers ``start``, the positions appended so far at that moment. Its
projector reads the log until its checkpoint covers ``start``, then applies the
buffer (records it already has are skipped by their positions, as always). A
subscription holds at most ``limit`` records; one that falls further behind is
dropped (``TailOverflow``) and its projector goes back to reading the log.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence

from events.log import LogRecord, Positions, advance, merge_max

Listener = Callable[[list[LogRecord], Positions, bool], None]


class TailOverflow(Exception):
    """The projector fell more than the subscription's limit behind the writer, or the
    tail could not vouch for what was appended: it must read the log."""


class LogTail:
    """Fan-out of appended records to in-process subscribers."""

    def __init__(self, *, limit: int = 100_000) -> None:
        self.appended: Positions = {}
        self.limit = limit
        self._subs: set[TailSubscription] = set()
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        """Call ``listener(records, positions, complete)`` with every append as well
        (``hub.views_process`` sends them on to the process that runs the views)."""
        self._listeners.append(listener)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def reset(self, positions: Positions) -> None:
        """The log's end as read at start-up (before anything is appended)."""
        merge_max(self.appended, positions)

    def publish(
        self, records: Sequence[LogRecord], positions: Positions | None = None,
        *, complete: bool = True,
    ) -> None:  # fmt: skip
        """Records just appended, in append order, with their positions (``positions``:
        ``advance({}, records)`` if the caller has it already).

        ``complete=False``: something else may have been appended since the previous
        records (another writer), which the tail cannot hand over; every subscriber is
        sent back to the log (as on an overflow), which has it all.
        """
        if not records:
            return
        if positions is None:
            positions = advance({}, records)
        merge_max(self.appended, positions)
        batch = list(records)
        for sub in list(self._subs):  # an overflowing one leaves the set
            if complete:
                sub.put(batch)
            else:
                sub.drop()
        for listener in self._listeners:
            listener(batch, positions, complete)

    def gap(self, positions: Positions) -> None:
        """Records up to ``positions`` were appended but are not handed over (the
        writer's process skipped them): every subscriber reads the log again."""
        merge_max(self.appended, positions)
        for sub in list(self._subs):
            sub.drop()

    def subscribe(self) -> TailSubscription:
        sub = TailSubscription(self, dict(self.appended), self.limit)
        self._subs.add(sub)
        return sub

    def _drop(self, sub: TailSubscription) -> None:
        self._subs.discard(sub)


class TailSubscription:
    """Every batch appended since ``start``, until closed or overflowed."""

    def __init__(self, tail: LogTail, start: Positions, limit: int) -> None:
        self.start = start
        self._tail = tail
        self._limit = limit
        self._batches: deque[list[LogRecord]] = deque()
        self._count = 0
        self._ready = asyncio.Event()
        self.overflowed = False

    def drop(self) -> None:
        """Give up: the subscriber must read the log again (``get`` raises)."""
        self.overflowed = True
        self._batches.clear()
        self._count = 0
        self._tail._drop(self)
        self._ready.set()

    def put(self, batch: list[LogRecord]) -> None:
        if self.overflowed:
            return
        if self._count + len(batch) > self._limit:
            self.drop()
            return
        self._batches.append(batch)
        self._count += len(batch)
        self._ready.set()

    async def get(self, max_records: int, timeout: float) -> list[LogRecord]:
        """The buffered records in append order, at most ``max_records``; empty after
        ``timeout`` seconds without any.

        Raises:
            TailOverflow: the buffer overflowed; what it held is gone.
        """
        if not self._batches and not self.overflowed:
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                return []
        if self.overflowed:
            raise TailOverflow(f"more than {self._limit:,} records behind the writer")
        out: list[LogRecord] = []
        while self._batches and len(out) < max_records:
            first = self._batches[0]
            room = max_records - len(out)
            if len(first) <= room:
                out.extend(self._batches.popleft())
            else:  # a large append is applied in parts of at most max_records
                out.extend(first[:room])
                self._batches[0] = first[room:]
        self._count -= len(out)
        if not self._batches:
            self._ready.clear()
        return out

    def close(self) -> None:
        self._tail._drop(self)
        self._batches.clear()
        self._count = 0
