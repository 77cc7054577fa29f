"""In-process counters of the hub (exposed by ``hub.query.metrics`` and logs)."""

from __future__ import annotations

from collections import Counter


class Metrics:
    """Monotonic counters, by name and label."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    def inc(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def get(self, name: str) -> int:
        return self.counters[name]

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self.counters.items()))
