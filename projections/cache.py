"""What a projection last wrote, kept in memory so the next batch need not read it back."""

from __future__ import annotations

from typing import Generic, TypeVar

from events.log import Positions
from handlers.registry import InstanceKey

V = TypeVar("V")


class InstanceCache(Generic[V]):
    """Live instances as a projection last wrote them, valid at one checkpoint (``at``).

    A projection folds a batch over these instead of reading them back; it is the
    only writer of its view while its checkpoint is where it left it, so any doubt
    (another checkpoint, a failed or refused write, after which the cached instances
    may be folded further than written) empties the cache. At most ``limit``
    instances, the earliest cached dropped first.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.at: Positions | None = None
        self.entries: dict[InstanceKey, V] = {}

    def valid_at(self, checkpoint: Positions) -> None:
        if checkpoint != self.at:
            self.clear()

    def clear(self) -> None:
        self.at = None
        self.entries.clear()

    def load(self, entries: dict[InstanceKey, V], at: Positions) -> None:
        """Fill the cache with what the view held at checkpoint ``at`` (start-up)."""
        self.clear()
        for k, v in entries.items():
            if len(self.entries) >= self.limit:
                break
            self.entries[k] = v
        self.at = at

    def remember(self, written: dict[InstanceKey, V | None], at: Positions) -> None:
        """After a committed batch: what it wrote (None: left the live view)."""
        entries = self.entries
        for k, v in written.items():
            if v is None:
                entries.pop(k, None)
            else:
                entries[k] = v  # an instance already cached keeps its place
        while len(entries) > self.limit:
            del entries[next(iter(entries))]
        self.at = at
