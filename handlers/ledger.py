"""Which ingress sequence numbers are already recorded in the event log (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SeqLedger:
    """The set of recorded ingress sequences, kept small: a floor plus what lies above it.

    After a crash, JetStream re-delivers the unacknowledged messages *after*
    newer ones may already have been recorded, so "at or below the highest
    recorded sequence" does not mean "recorded". The ledger answers exactly.

    Attributes:
        floor: every sequence at or below it is recorded (or gone from the stream).
        above: recorded sequences above the floor (the out-of-order window).
    """

    floor: int = 0
    above: set[int] = field(default_factory=set)

    def add(self, seq: int) -> None:
        if seq == self.floor + 1 and not self.above:  # the common, in-order case
            self.floor = seq
            return
        if seq <= self.floor:
            return
        self.above.add(seq)
        self._advance()

    def seen(self, seq: int) -> bool:
        return seq <= self.floor or seq in self.above

    def raise_floor(self, first_available: int) -> None:
        """Sequences below ``first_available`` are gone from the stream: never re-delivered."""
        if first_available - 1 > self.floor:
            self.floor = first_available - 1
            self.above = {s for s in self.above if s > self.floor}
            self._advance()

    @property
    def high(self) -> int:
        """The highest recorded sequence."""
        return max(self.above, default=self.floor)

    def _advance(self) -> None:
        while self.floor + 1 in self.above:
            self.floor += 1
            self.above.discard(self.floor)
