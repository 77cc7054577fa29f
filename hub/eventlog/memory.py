"""An event log in memory: the port's whole promise, without a server.

Not a mock: it keeps what the real adapters keep and reads the way they read, so
the core's tests can run on it and the contract suite holds it to the same rules
(``tests/integration/test_event_log_contract.py``).

* A ``MemoryLogStore`` stands for the server (NATS, Kafka): named logs, each a few
  partitions of encoded records. A ``MemoryEventLog`` is a handle on one of them, as
  ``JetStreamEventLog`` is on a stream; several handles (a writer, read-only
  readers) can share a store, and anything else can put bytes in a log through the
  store, as anyone allowed to publish could (readers skip what is not an event).
* Events are stored encoded and decoded when read, as on the wire.
* Positions are per partition, from 0, like Kafka offsets; an event's partition is
  a stable hash of its ``partition_key`` (one instance's events stay in order).
* The compaction rule of the real logs, applied at once (as JetStream's roll-up
  does): a record with a compaction key removes the previous record with the same
  key. Its position is not reused.
* No deduplication: appending the same events again stores them again. The port does
  not promise it (Kafka's idempotent producer only drops its own retries), so code
  tested on this log cannot come to rely on it.
"""

from __future__ import annotations

import asyncio
import zlib
from bisect import bisect_left
from collections.abc import AsyncIterator, Sequence
from typing import cast

from events.codec import encode_event
from events.log import LogRecord, Positions
from events.model import AnyEvent, Event, compaction_key, partition_key
from hub.eventlog.port import EventLogNotFound, decode_records

__all__ = ["MemoryEventLog", "MemoryLogStore"]


class _Partition:
    """Records of one partition by position; removed (superseded) ones leave a gap."""

    def __init__(self) -> None:
        self.next = 0
        self.positions: list[int] = []  # ascending; may still list removed positions
        self.data: dict[int, bytes] = {}

    def put(self, data: bytes) -> int:
        position = self.next
        self.next += 1
        self.positions.append(position)
        self.data[position] = data
        return position

    def remove(self, position: int) -> None:
        del self.data[position]
        # Keep the index about as small as what is left (a reader looks its place up
        # again by position for every batch, so dropping entries cannot confuse it).
        if len(self.positions) > 1024 and len(self.positions) > 2 * len(self.data):
            self.positions = [p for p in self.positions if p in self.data]

    def since(self, position: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` records at or after ``position``, in order."""
        out: list[tuple[int, bytes]] = []
        positions, data = self.positions, self.data
        for i in range(bisect_left(positions, position), len(positions)):
            p = positions[i]
            if p in data:
                out.append((p, data[p]))
                if len(out) == limit:
                    break
        return out


class _Log:
    def __init__(self, partitions: int) -> None:
        self.partitions = [_Partition() for _ in range(partitions)]
        self.latest: dict[str, tuple[int, int]] = {}  # compaction key -> where its record is
        self.appends = 0  # records put by anyone: how a writer tells it was alone
        self.changed = asyncio.Event()  # set (and replaced) whenever records are put

    def put(self, records: Sequence[tuple[int, bytes, str | None]]) -> list[int]:
        """Store ``(partition, data, compaction key)`` records, all at once; their positions."""
        out = []
        for partition, data, key in records:
            position = self.partitions[partition].put(data)
            if key is not None:
                previous = self.latest.get(key)
                if previous is not None:
                    self.partitions[previous[0]].remove(previous[1])
                self.latest[key] = (partition, position)
            out.append(position)
        self.appends += len(records)
        if records:
            changed, self.changed = self.changed, asyncio.Event()
            changed.set()
        return out

    def end(self) -> Positions:
        return {p: part.next for p, part in enumerate(self.partitions)}


class MemoryLogStore:
    """What a server holds for the memory log: named logs of partitioned records."""

    def __init__(self) -> None:
        self._logs: dict[str, _Log] = {}

    def open(self, name: str, *, partitions: int, create: bool) -> _Log:
        """The log ``name``; made with ``partitions`` if it does not exist and ``create``."""
        found = self._logs.get(name)
        if found is not None:
            return found
        if not create:
            raise EventLogNotFound(f"memory log {name!r} does not exist")
        made = self._logs[name] = _Log(partitions)
        return made

    def __contains__(self, name: str) -> bool:
        return name in self._logs

    def put(self, name: str, data: bytes, *, partition: int = 0, key: str | None = None) -> int:
        """Put any bytes in log ``name`` (as a foreign publisher could); their position."""
        return self.open(name, partitions=1, create=False).put([(partition, data, key)])[0]


class MemoryEventLog:
    """Events in a ``MemoryLogStore`` (a store of its own unless one is given).

    Args:
        store: where the log lives; share one between handles to read what another
            handle appends.
        name: the log's name in the store.
        partitions: how many partitions a new log gets (an existing log keeps its own).
        read_only: a reader's handle (as replay and verify open the log): ``start``
            does not create the log (``EventLogNotFound`` if missing) and ``append``
            raises.
    """

    name = "memory"

    def __init__(
        self,
        store: MemoryLogStore | None = None,
        *,
        name: str = "events",
        partitions: int = 1,
        read_only: bool = False,
    ) -> None:
        if partitions < 1:
            raise ValueError("a log has at least one partition")
        self.store = store if store is not None else MemoryLogStore()
        self.log_name = name
        self._partitions = partitions
        self._read_only = read_only
        self._log: _Log | None = None
        self._appends_seen = 0  # the log's append count after this writer's last append
        self.exclusive = False

    async def start(self) -> None:
        self._log = self.store.open(
            self.log_name, partitions=self._partitions, create=not self._read_only
        )
        self._appends_seen = self._log.appends

    async def close(self) -> None:
        return None

    def _opened(self) -> _Log:
        if self._log is None:
            raise RuntimeError("MemoryEventLog: used before start()")
        return self._log

    def partition_of(self, event: Event) -> int:
        """The partition of ``event``: a stable hash of its instance (or tenant)."""
        count = len(self._opened().partitions)
        return zlib.crc32(partition_key(event).encode()) % count

    async def append(self, events: Sequence[Event]) -> list[LogRecord]:
        if self._read_only:
            raise RuntimeError("MemoryEventLog: append on a read-only log")
        log = self._opened()
        if not events:
            return []
        # Encode everything first: an event that cannot be encoded leaves nothing behind.
        records = [(self.partition_of(e), encode_event(e), compaction_key(e)) for e in events]
        self.exclusive = log.appends == self._appends_seen
        positions = log.put(records)
        self._appends_seen = log.appends
        return [
            LogRecord(partition, position, cast(AnyEvent, e))
            for (partition, _, _), position, e in zip(records, positions, events, strict=True)
        ]

    async def end_positions(self) -> Positions:
        return self._opened().end()

    async def read(
        self, start: Positions | None = None, *, follow: bool = True, batch: int = 1000
    ) -> AsyncIterator[list[LogRecord]]:
        log = self._opened()
        at = {p: max((start or {}).get(p, 0), 0) for p in range(len(log.partitions))}
        end = log.end()
        turn = -1
        while True:
            changed = log.changed  # taken before looking, so no append is missed
            raw: list[tuple[int, int, bytes | None]] = []
            count = len(log.partitions)
            turn = (turn + 1) % count  # partitions take turns at filling a batch first
            for p in [*range(turn, count), *range(turn)]:
                if len(raw) >= batch:
                    break
                for position, data in log.partitions[p].since(at[p], batch - len(raw)):
                    if not follow and position >= end[p]:
                        break
                    raw.append((p, position, data))
                    at[p] = position + 1
            if raw:
                records = decode_records(raw)
                if records:
                    yield records
                await asyncio.sleep(0)  # a long read lets everything else run
                continue
            if not follow:
                return
            await changed.wait()
