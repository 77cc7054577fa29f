"""Crash points for the crash tests: ``HUB_FAULTS=name[,name]`` makes the process kill
itself (SIGKILL, nothing flushed) when it reaches a named point.

Only tests set ``HUB_FAULTS``; without it ``point`` is one dictionary look-up. The
points are where a crash matters to exactly-once delivery:

* ``notification_due_recorded``: right after a ``NotificationDue`` is in the log,
  before anything is sent;
* ``notification_sent_unrecorded``: right after a receiver took a notification,
  before ``NotificationSent`` is recorded.
"""

from __future__ import annotations

import os
import signal

POINTS = frozenset({"notification_due_recorded", "notification_sent_unrecorded"})
_armed = frozenset(p for p in os.environ.get("HUB_FAULTS", "").split(",") if p)
if _armed - POINTS:
    raise ValueError(f"HUB_FAULTS: unknown crash point(s) {sorted(_armed - POINTS)}")


def point(name: str) -> None:
    """Die here (SIGKILL) if the crash point ``name`` is armed."""
    if name in _armed:
        os.kill(os.getpid(), signal.SIGKILL)
