"""The event log port: where recorded events live, in order, forever (see events.log)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from events.log import LogRecord, Positions
from events.model import Event

__all__ = ["EventLog", "LogRecord", "Positions"]


class EventLog(Protocol):
    """An append-only, partitioned, replayable log of events."""

    name: str
    # Whether the last append's records follow this writer's previous ones with nothing
    # else appended in between (False: unknown), which the log tail relies on.
    exclusive: bool

    async def start(self) -> None:
        """Connect, and create the log (topic / stream) if it does not exist."""

    async def close(self) -> None: ...

    async def append(self, events: Sequence[Event]) -> list[LogRecord]:
        """Append events in order; returns them as records, with where each was stored.

        Either all events are durably in the log when this returns, or it raises
        and (Kafka: the transaction aborted) none are visible to readers.
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
