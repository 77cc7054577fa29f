"""The projection port: a view that applies log records and keeps its own checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from events.log import LogRecord, Positions
from projections.canonical import Rendering
from projections.fold import ViewState

# What a view's readers are told of it (the Redis view's ``hub:_meta:view:<projection>``):
# READY, the view holds the fold of the log up to its checkpoint (an empty log: no
# checkpoint); REBUILDING, its projector found it lost and is rebuilding it from the log.
READY = "ready"
REBUILDING = "rebuilding"


class Projection(Protocol):
    """A materialised view of the event log.

    ``apply`` writes the effect of the records *and* the new checkpoint in one
    atomic step, and skips every record its checkpoint already covers, so a
    re-delivered batch, or a crash between write and acknowledgement, changes
    nothing. It never applies records over a hole: if the view's checkpoint is no
    longer at or past what this projection last applied or attached to (the view was
    emptied, restored from an older copy, or replaced by ``hub replay``), it raises
    ``ViewLost`` and writes nothing.

    ``snapshot`` and ``rendering`` are what ``hub verify`` compares: a view holds the
    fold of the records its checkpoint covers when its snapshot's lines equal
    ``rendering.expected`` of that fold.
    """

    name: str

    @property
    def rendering(self) -> Rendering:
        """How the fold looks in this view, as the canonical lines ``snapshot`` reads."""
        ...

    async def setup(self) -> None:
        """Create or migrate what the view needs (idempotent)."""

    async def warm(self) -> None:
        """Load what the view holds into memory (start-up), so that the first batches
        need not read it back one instance at a time; optional, never required."""

    async def checkpoint(self) -> Positions:
        """The next position per partition this view has applied up to."""
        ...

    async def attach(self) -> Positions:
        """The view's checkpoint, taken from now on as what the view holds at least.

        Raises:
            ViewLost: the checkpoint is behind what this projection applied before.
        """
        ...

    async def examine(self) -> list[str]:
        """Check (cheaply, while idle) that the view still holds what this projection
        wrote; returns notices worth a log line (a Redis server that restarted with the
        view intact, a status marker put back).

        Raises:
            ViewLost: the checkpoint is missing or behind what this projection applied.
        """
        ...

    async def mark(self, state: str, reason: str = "") -> None:
        """Tell the view's readers its state (READY or REBUILDING); a view nobody reads
        but through ``hub verify`` may ignore it."""

    async def apply(self, records: Sequence[LogRecord]) -> Positions:
        """Apply records not yet covered; returns the new checkpoint."""
        ...

    async def rebuild(self, view: ViewState, positions: Positions) -> None:
        """Replace the whole view with the fold ``view`` of the log up to ``positions``
        (written aside, checked, swapped in atomically with that checkpoint); READY."""

    async def snapshot(self) -> tuple[Positions, dict[str, str]]:
        """The checkpoint and the whole view as canonical lines (``rendering``), read as
        of one moment (both from the same state of the view)."""
        ...


class ViewMismatch(RuntimeError):
    """A rebuilt view does not equal the fold of the log it was built from."""


class ViewLost(RuntimeError):
    """The view no longer holds what its projection wrote (emptied, or replaced by an
    older copy): it must be rebuilt from the log before anything more is applied."""


def behind(checkpoint: Positions, floor: Positions) -> str | None:
    """Why ``checkpoint`` cannot be the view ``floor`` was applied to, or None."""
    if all(checkpoint.get(p, 0) >= n for p, n in floor.items()):
        return None
    if not checkpoint:
        return f"the view has no checkpoint, but this projector applied up to {floor}"
    return f"the view's checkpoint {checkpoint} is behind what this projector applied, {floor}"
