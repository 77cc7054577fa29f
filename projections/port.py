"""The projection port: a view that applies log records and keeps its own checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from events.log import LogRecord, Positions


class Projection(Protocol):
    """A materialised view of the event log.

    ``apply`` writes the effect of the records *and* the new checkpoint in one
    atomic step, and skips every record its checkpoint already covers, so a
    re-delivered batch, or a crash between write and acknowledgement, changes
    nothing.
    """

    name: str

    async def setup(self) -> None:
        """Create or migrate what the view needs (idempotent)."""

    async def warm(self) -> None:
        """Load what the view holds into memory (start-up), so that the first batches
        need not read it back one instance at a time; optional, never required."""

    async def checkpoint(self) -> Positions:
        """The next position per partition this view has applied up to."""
        ...

    async def apply(self, records: Sequence[LogRecord]) -> Positions:
        """Apply records not yet covered; returns the new checkpoint."""
        ...


class ViewMismatch(RuntimeError):
    """A rebuilt view does not equal the fold of the log it was built from."""
