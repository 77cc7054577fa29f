"""The event log port: where recorded events live, in order, forever (see events.log)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import msgspec
import structlog

from events.codec import decode_event
from events.log import LogRecord, Positions
from events.model import Event

__all__ = ["EventLog", "EventLogNotFound", "LogRecord", "Positions", "decode_records"]

log = structlog.get_logger(__name__)
NOT_AN_EVENT = (msgspec.DecodeError, TypeError)  # TypeError: no value at all (None)


class EventLogNotFound(LookupError):
    """A log opened read-only does not exist (a reader never creates it)."""


def decode_records(raw: list[tuple[int, int, bytes | None]]) -> list[LogRecord]:
    """Records of ``(partition, position, bytes)``, leaving out what is not an event.

    The hub is the log's only writer, but anyone allowed to publish on its subjects
    (or produce to its topic) can put something else there. Such a message is logged
    and left out, instead of failing every reader of the log (projections, the
    start-up fold, replay) again and again. The batch is decoded in one go; only if
    that fails, record by record.
    """
    try:
        return [LogRecord(p, o, decode_event(d)) for p, o, d in raw]  # type: ignore[arg-type]
    except NOT_AN_EVENT:
        pass
    out = []
    for partition, position, data in raw:
        try:
            out.append(LogRecord(partition, position, decode_event(data)))  # type: ignore[arg-type]
        except NOT_AN_EVENT as exc:
            log.warning("log_record_not_an_event_skipped", partition=partition,
                        position=position, error=str(exc)[:200],
                        excerpt=(data or b"")[:80].decode(errors="backslashreplace"))  # fmt: skip
    return out


class EventLog(Protocol):
    """An append-only, partitioned, replayable log of events.

    Adapters: ``JetStreamEventLog``, ``KafkaEventLog``, ``MemoryEventLog``; the contract
    suite (``tests/integration/test_event_log_contract.py``) holds each to this page.
    Positions are per partition (see ``events.log``); records of one partition are read
    in position order, partitions in no particular order between them. Only the latest
    event of a compaction key (``events.model.compaction_key``: heartbeats, check
    results) is sure to stay: the ones it supersedes go, at once or some time later.
    Something in the log that is not an event is logged and left out by readers.
    """

    name: str
    # Whether the last append's records follow this writer's previous ones with nothing
    # else appended in between (False: unknown), which the log tail relies on.
    exclusive: bool

    async def start(self) -> None:
        """Connect, and create the log (topic / stream) if it does not exist.

        A log opened read-only (``hub.bootstrap.make_event_log(..., read_only=True)``: replay,
        verify, the views process) neither creates the log nor changes its settings:
        ``EventLogNotFound`` if it does not exist; its ``append`` raises RuntimeError.
        """

    async def close(self) -> None: ...

    async def append(self, events: Sequence[Event]) -> list[LogRecord]:
        """Append events in order; returns them as records, with where each was stored.

        Either all events are durably in the log when this returns, or it raises
        and (Kafka: the transaction aborted) none are visible to readers. Readers see
        them once ``end_positions()`` has passed them: at once on JetStream and in
        memory, a moment later on Kafka (a transaction's commit markers are written
        after the commit returns, and readers of committed records wait for them).

        Appending an event again (a batch retried after an unknown outcome) is allowed
        and returns where the event is; the log may then hold it twice (Kafka, memory)
        or once (JetStream drops a copy within its duplicate window). No deduplication
        is promised: readers skip what their checkpoint or ledger already has.
        """
        ...

    async def end_positions(self) -> Positions:
        """The next position of every partition: the end of what readers can see now."""
        ...

    def read(
        self, start: Positions | None = None, *, follow: bool = True, batch: int = 1000
    ) -> AsyncIterator[list[LogRecord]]:
        """Batches of records from ``start`` (the beginning if None).

        With ``follow=False`` the iterator ends once it has read everything
        that ``end_positions()`` reported when it began.
        """
        ...
