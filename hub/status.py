"""What the hub knows of its own health, said without the event log.

When the log cannot be written, nothing the hub records reaches anyone: the
monitor's ``hub-kafka UNHEALTHY`` is itself an event waiting for that log. So
the hub says it on its own, at once: a structured log line, a core-NATS notice
on ``hub.events._hub.<kind>`` (``log_stalled``, ``log_recovered``), and
``hub.query.status``, which answers from memory with ``DEGRADED`` and the
reasons. Query replies meanwhile carry ``metadata.degraded``: they may be stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client

from events.names import HUB_TENANT
from events.subjects import watch_subject
from events.vocab import Condition

log = structlog.get_logger(__name__)


class HubStatus:
    """The hub's own health: its role, the event log's writability, restarts.

    Attributes:
        role: ``starting``, ``standby`` (waiting for the writer lease), ``writer``
            or ``stopping``.
        log_stalled_since: when the current append started to stall (None: it
            does not).
        log_error: the last append error while stalled.
        restarts: internal tasks restarted, by name.
    """

    def __init__(self, event_log: str, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.event_log = event_log
        self.nc: Client | None = None
        self.role = "starting"
        self.started_at = clock()
        self.log_stalled_since: float | None = None
        self.log_error: str | None = None
        self.nats_disconnected_since: float | None = None
        self.restarts: dict[str, int] = {}
        self.last_failure: dict[str, str] = {}

    # -- the event log -----------------------------------------------------------------

    async def log_stalled(self, error: str, *, waiting: int) -> None:
        """The append has failed or not completed in time: say so (once per stall)."""
        self.log_error = error
        if self.log_stalled_since is not None:
            return
        self.log_stalled_since = self._clock()
        log.error("event_log_stalled", event_log=self.event_log, error=error,
                  events_waiting=waiting)  # fmt: skip
        await self._announce("log_stalled", error=error, events_waiting=waiting)

    async def log_recovered(self) -> None:
        if self.log_stalled_since is None:
            return
        stalled_s = self._clock() - self.log_stalled_since
        self.log_stalled_since = None
        self.log_error = None
        log.warning("event_log_recovered", event_log=self.event_log, stalled_s=round(stalled_s, 3))
        await self._announce("log_recovered", stalled_s=round(stalled_s, 3))

    async def _announce(self, kind: str, **fields: Any) -> None:
        """A core-NATS notice (at most once; it must not need the log)."""
        nc = self.nc
        if nc is None or not nc.is_connected:
            return
        body = {"type": kind, "tenant": HUB_TENANT, "ts": self._clock(),
                "event_log": self.event_log, **fields}  # fmt: skip
        try:
            await nc.publish(watch_subject(HUB_TENANT, kind), msgspec.json.encode(body))
        except Exception as exc:  # the notice is best effort; the log line is not
            log.info("hub_notice_failed", kind=kind, error=repr(exc))

    # -- tasks and connections ---------------------------------------------------------

    def restarted(self, task: str, error: BaseException) -> None:
        self.restarts[task] = self.restarts.get(task, 0) + 1
        self.last_failure[task] = repr(error)

    def nats_disconnected(self) -> None:
        if self.nats_disconnected_since is None:
            self.nats_disconnected_since = self._clock()

    def nats_reconnected(self) -> None:
        self.nats_disconnected_since = None

    # -- the answer ----------------------------------------------------------------------

    def problems(self) -> list[str]:
        now = self._clock()
        out = []
        if self.role != "writer":
            out.append(f"not the writer ({self.role})")
        if self.log_stalled_since is not None:
            out.append(
                f"the {self.event_log} event log cannot be written for "
                f"{now - self.log_stalled_since:.1f} s: {self.log_error}"
            )
        if self.nats_disconnected_since is not None:
            out.append(f"NATS disconnected for {now - self.nats_disconnected_since:.1f} s")
        return out

    @property
    def status(self) -> Condition:
        return Condition.DEGRADED if self.problems() else Condition.HEALTHY

    def degraded_note(self) -> str | None:
        """For query replies: why they may be stale (None: they are not)."""
        if self.log_stalled_since is None:
            return None
        return (f"the event log cannot be written since {_iso(self.log_stalled_since)}: "
                "this answer may be stale")  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "problems": self.problems(),
            "role": self.role,
            "started_at": self.started_at,
            "event_log": {
                "kind": self.event_log,
                "writable": self.log_stalled_since is None,
                "stalled_since": self.log_stalled_since,
                "error": self.log_error,
            },
            "restarts": dict(self.restarts),
            "last_failure": dict(self.last_failure),
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
