"""The status vocabularies, each spelled once: instance health, infrastructure status,
and the summary health of a whole (a service, a tenant, the hub).

Each is a ``StrEnum``: a member *is* its wire string (``Health.CRITICAL == "critical"``),
so it is encoded, stored and compared as the plain string (msgspec, asyncpg, Redis,
f-strings), and a string read back from a view or the log compares equal to it.

Event fields that hold a status stay ``str``: a field's type never changes, and the
fold must accept whatever an older hub recorded. The spelling on the wire is part of
the contract: instance health lowercase, the others uppercase.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, get_args


class Health(StrEnum):
    """An instance's health, as the registry records it and the views show it."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    CRITICAL = "critical"  # missed its lease: no heartbeat within the TTL
    DEREGISTERED = "deregistered"
    EXPIRED = "expired"


# The health an instance may report of itself (a heartbeat's ``status``). A Literal,
# not the enum: msgspec validates Literals of strings only, and the wire must refuse
# ``critical`` & co. Each value must be a Health (checked here, at import).
HealthStatus = Literal["healthy", "degraded", "unhealthy"]
REPORTABLE: frozenset[Health] = frozenset(Health(s) for s in get_args(HealthStatus))


class InfraStatus(StrEnum):
    """An infrastructure component's status; a check result is HEALTHY or UNHEALTHY."""

    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    UNKNOWN = "UNKNOWN"  # no check result yet


class Condition(StrEnum):
    """The summary health of a whole: a service over its instances and a tenant over
    its services (``hub.query.health``), the hub itself (``hub.query.status``: HEALTHY
    or DEGRADED)."""

    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"
    UNHEALTHY = "UNHEALTHY"
    UNKNOWN = "UNKNOWN"  # nothing to judge: a tenant without services


__all__ = ["REPORTABLE", "Condition", "Health", "HealthStatus", "InfraStatus"]
