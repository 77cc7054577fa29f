"""A deadline structure for timers (pure): what is due at ``now`` costs what is due.

The hub's timers (lease lapse, expiry, the end of flapping) sit here keyed by the time
their decision can first be due, instead of being found by scanning every instance on
every tick. A key is a *lower bound*: the timer re-checks its exact rule when the key
comes, and schedules again if the decision is not due yet. So a deadline that only moves
later (a heartbeat extends a lease) needs no update at all; what may move one earlier (a
registration, a status change, a shorter lease) marks its subject ``touched``, and the
timer schedules it again on its next turn.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class Deadlines(Generic[K]):
    """A min-heap of ``(when, key)``; a key may sit in it more than once (stale entries are
    re-checked and dropped by whoever pops them, which is cheaper than removing them)."""

    _heap: list[tuple[float, int, K]] = field(default_factory=list)
    _n: int = 0

    def push(self, when: float, key: K) -> None:
        self._n += 1
        heapq.heappush(self._heap, (when, self._n, key))

    def pop_due(self, now: float) -> list[K]:
        """Every key whose time has come (``when <= now``), each once, earliest first."""
        heap = self._heap
        out: dict[K, None] = {}
        while heap and heap[0][0] <= now:
            out[heapq.heappop(heap)[2]] = None
        return list(out)

    def next(self) -> float:
        """The earliest time in the structure (``inf`` when empty)."""
        return self._heap[0][0] if self._heap else math.inf

    def __len__(self) -> int:
        return len(self._heap)


@dataclass
class TimerState(Generic[K]):
    """What the lease timer keeps between turns (derived from the registry, never recorded).

    Attributes:
        deadlines: subjects by the earliest time a decision about them can be due.
        touched: subjects whose deadline may have moved earlier since the last turn
            (kept by the fold, ``handlers.registry.evolve``).
        held: per tenant, subjects due to expire while the tenant is in
            self-preservation (looked at again when it ends).
        deferred: subjects with a lease decision due while the hub does not judge
            leases (it lags behind its ingress); looked at again when it does.
        floor: the lease floor the deadlines were computed with.
    """

    deadlines: Deadlines[K] = field(default_factory=Deadlines)
    touched: set[K] = field(default_factory=set)
    held: dict[str, set[K]] = field(default_factory=dict)
    deferred: set[K] = field(default_factory=set)
    floor: float = 0.0
