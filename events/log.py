"""Records and positions of the event log (pure types shared by the hub and projections).

Positions are *next* positions, per partition: ``{partition: n}`` means every
record of that partition before ``n`` is covered (Kafka: the next offset to read;
JetStream: the next stream sequence). A projection stores exactly this as its
checkpoint, so "applied through" and "appended through" compare directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from events.model import AnyEvent

Positions = dict[int, int]


@dataclass(slots=True)
class LogRecord:
    """One event as read back from the log, with where it sits.

    Not frozen: a frozen dataclass's __init__ costs several times more, and a
    replay makes a million of these.
    """

    partition: int
    position: int  # offset / stream sequence of this record
    event: AnyEvent


def covers(applied: Positions, needed: Positions) -> bool:
    """Whether ``applied`` has reached every partition position in ``needed``."""
    return all(applied.get(p, 0) >= n for p, n in needed.items())


def merge_max(into: Positions, other: Positions) -> Positions:
    """Raise ``into`` to ``other`` partition by partition (in place); returns ``into``."""
    for p, n in other.items():
        if n > into.get(p, 0):
            into[p] = n
    return into


def unseen(records: Sequence[LogRecord], checkpoint: Positions) -> list[LogRecord]:
    """The records a view with ``checkpoint`` has not applied yet, each once, in order.

    A record at or below the checkpoint, or at or below a record of the same
    partition earlier in the batch (a duplicate, or an older one re-delivered
    after a newer one), is dropped: positions only move forward.
    """
    at = dict(checkpoint)
    out = []
    for r in records:
        if r.position >= at.get(r.partition, 0):
            out.append(r)
            at[r.partition] = r.position + 1
    return out


def advance(checkpoint: Positions, records: Sequence[LogRecord]) -> Positions:
    """The checkpoint after applying ``records``."""
    new = dict(checkpoint)
    get = new.get
    for r in records:
        n = r.position + 1
        if n > get(r.partition, 0):
            new[r.partition] = n
    return new
