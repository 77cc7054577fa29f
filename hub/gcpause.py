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


# Generation-0 threshold while serving (CPython's default is 700): the ingest loop and
# the projections allocate and free a few dozen objects per message, nearly all freed
# by reference counting, so at the default the collector ran ~60 times a second over a
# large live heap. Measured by bench/ingest: 5 % of the hub's time, 0.2 % with this.
SERVING_GEN0 = 50_000


def tune_for_serving() -> None:
    """After start-up: move what exists now (the folded state, the connections) out of
    the collector's sight for good (``gc.freeze``: it is long-lived, so rescanning it
    only costs), and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(SERVING_GEN0, max(gen1, 20), max(gen2, 100))
