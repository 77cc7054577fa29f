"""Garbage-collector control for bulk folds."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while folding a log.

    A fold allocates millions of small, long-lived, acyclic objects (records,
    events, instances); the collector re-scans them over and over, which was
    measured at a third of replay time (bench/replay). Reference counting still
    frees everything; the collector runs once afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
