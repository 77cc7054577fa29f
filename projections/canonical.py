"""What both views' renderings share (pure): the one JSON rendering, the fields both
name alike, and how ``hub verify`` compares two renderings.

Each view renders the fold as canonical lines, ``{row or key: one line}``
(``projections.postgres_render``, ``projections.redis_render``); the projections
write exactly those renderings, so "the view equals the fold" is a byte-for-byte
statement about the lines. A view's ``Rendering`` is everything verify needs of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from events.names import INFRA_TENANT

if TYPE_CHECKING:
    from projections.fold import ViewState

_json = msgspec.json.Encoder(order="sorted")
from_json = msgspec.json.decode


def to_json(value: Any) -> str:
    """The one JSON rendering of a structured field: compact, object keys sorted."""
    return _json.encode(value).decode()


# The fields of an instance a heartbeat sets, named alike in both views (PostgreSQL
# columns, Redis hash fields): a batch that only brings heartbeats for an instance
# changes no other field.
HEARTBEAT_FIELDS = ("last_seen", "load", "reported_status", "checks")
# The fields of a component its latest check result sets (``infra_status`` columns,
# component hash fields).
CHECK_FIELDS = ("last_result", "checked_at", "response_time_ms", "error", "metadata",
                "consecutive_failures")  # fmt: skip


# --- verify: what moved on, and comparing -------------------------------------------------


def instance_subject(tenant: str, service: str, instance: str) -> str:
    """How verify names an instance whose heartbeat may have moved on past a checkpoint."""
    return f"{tenant}/{service}/{instance}"


def component_subject(name: str) -> str:
    """How verify names a component whose check result may have moved on."""
    return f"{INFRA_TENANT}/{name}"


@dataclass(frozen=True)
class Rendering:
    """How the fold looks in one view, as canonical lines: what ``hub verify`` needs.

    Attributes:
        expected: the lines a view holding the fold ``view`` has (what its
            ``snapshot`` must return, checkpoint aside).
        volatile_of: the subject (``instance_subject``, ``component_subject``) of a
            line part of which is volatile (a heartbeat's fields, a last check);
            None for any other line.
        without_volatile: a line without those volatile fields.

    The log keeps only each instance's latest heartbeat and each component's latest
    check, so once a newer one lands past a view's checkpoint, the one the view applied
    is gone from the log: the fold up to the checkpoint cannot reproduce those fields,
    everything else it can.
    """

    expected: Callable[[ViewState], dict[str, str]]
    volatile_of: Callable[[str], str | None]
    without_volatile: Callable[[str], str]


def checksum(lines: Mapping[str, str]) -> str:
    """SHA-256 over the canonical lines, in key order."""
    h = hashlib.sha256()
    for key in sorted(lines):
        h.update(lines[key].encode())
        h.update(b"\n")
    return h.hexdigest()


def differences(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Human-readable differences between two canonical renderings (sorted by key)."""
    out = []
    for key in sorted(set(expected) | set(actual)):
        e, a = expected.get(key), actual.get(key)
        if e == a:
            continue
        if a is None:
            out.append(f"missing  {key}: expected {e}")
        elif e is None:
            out.append(f"extra    {key}: {a}")
        else:
            out.append(f"differs  {key}:\n    expected {e}\n    actual   {a}")
    return out
