"""Pure decisions and the fold: ``(state, candidate, now) -> events``. No I/O.

``handlers.core.step`` is the one path every candidate takes (ingress messages,
results from inside the hub, the lease timer's turn); ``REACTIONS`` says which
decision each event type goes through, ``evolve`` folds what was decided.
"""

from __future__ import annotations

from handlers.core import REACTIONS, decide, react, step
from handlers.liveness import tick
from handlers.registry import LivenessPolicy, RegistryState, evolve, fold

__all__ = [
    "REACTIONS",
    "LivenessPolicy",
    "RegistryState",
    "decide",
    "evolve",
    "fold",
    "react",
    "step",
    "tick",
]
