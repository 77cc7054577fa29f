"""Read-your-writes: which ingress sequence each view reflects.

The ingest loop reports, per appended batch, the highest ingress sequence it
covers and the log positions written so far; each projector reports the
positions it has applied. A query carrying ``min_seq`` waits until its view
covers the positions recorded for the first batch that reached ``min_seq``.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import deque

from events.log import Positions, covers, merge_max


class Progress:
    """In-process tracker of ingest and projection progress."""

    def __init__(self, *, history: int = 20_000) -> None:
        self.ingested_seq = 0
        self._seqs: deque[int] = deque(maxlen=history)
        self._positions: deque[Positions] = deque(maxlen=history)
        self._appended: Positions = {}
        self.views: dict[str, Positions] = {}
        self._changed = asyncio.Condition()

    async def _notify(self) -> None:
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

    def up_to_date(self, view: str) -> bool:
        """Whether ``view`` has applied everything appended so far (positions of records
        actually written, so Kafka's transaction markers do not count)."""
        return covers(self.views.get(view, {}), self._appended)

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

    async def wait(self, view: str, min_seq: int, timeout: float) -> bool:
        """Wait until ``view`` reflects ``min_seq``; False after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self.reflects(view, min_seq))
            return True
        except TimeoutError:
            return False
