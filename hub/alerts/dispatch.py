"""The sending side of the outbox: notifications in, ``NotificationSent``/``Failed`` out.

The core records a ``NotificationDue`` and then ``offer``s it here. Each integration id
(``<receiver>/<type>/<index>``) has a queue of its own, worked by a task of its own in
order of ``not_before``, behind a token bucket of its own (``rate_per_s``/``burst``): a
receiver that is slow, failing or rate limited holds up nothing but its own queue. The
outcome of each try goes back to the core through ``submit`` as an event to record:

* the receiver took it: ``NotificationSent`` (id ``<nid>.sent``);
* it did not: ``NotificationFailed`` (id ``<nid>.failed.<attempt>``) with the time of
  the next try, which is then queued: the receiver's ``Retry-After`` when it gave one,
  else exponential backoff with equal jitter; ``next_attempt_at`` is 0 when the
  notification is given up (a permanent failure, ``max_attempts`` used up, or an
  integration that is no longer configured).

Nothing here remembers across a restart: the core folds the log and offers again every
notification that is due and not sent, with its attempt number. A notification sent
but not yet recorded when the hub dies is sent twice; the webhook's ``Idempotency-Key``
(the notification id) lets the receiver drop the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import get_args

import httpx
import msgspec
import structlog
from aiolimiter import AsyncLimiter
from nats.aio.client import Client as NatsClient

from events.model import Event, NotificationDue, NotificationFailed, NotificationSent
from handlers.alert_rules import HUB_TENANT, Integration, ReceiverType
from hub import faults
from hub.alerts.payload import render
from hub.alerts.receivers import (
    Delivery,
    EmailSender,
    LogSender,
    NatsSender,
    Sender,
    WebhookSender,
    permanent,
    retryable,
)
from hub.infra.checkers import preload

log = structlog.get_logger(__name__)

ConfigLookup = Callable[[str], Integration | None]
Submit = Callable[[Event], None]
HttpClient = httpx.AsyncClient | Callable[[], httpx.AsyncClient]

# What still works while the event log is down (no outbox): nothing slow, nothing remote
# that would need retries we could not record.
OUT_OF_BAND_TYPES = frozenset({"log", "nats"})
# A receiver's Retry-After is honoured up to this (a typo of a year would stall a
# notification past any use).
MAX_RETRY_AFTER_S = 3600.0
# A worker waiting for a retry time looks at the clock again at least this often (the
# clock is wall time, which can jump).
MAX_WAIT_S = 5.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class _Job:
    due: NotificationDue
    attempt: int
    not_before: float


@dataclass(eq=False)
class _Queue:
    """One integration's notifications, soonest first, and what works them."""

    heap: list[tuple[float, int, _Job]] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    limiter: AsyncLimiter | None = None
    limit: tuple[float, int] = (0.0, 0)  # (rate_per_s, burst) the limiter was built for

    def throttle(self, integration: Integration) -> AsyncLimiter | None:
        """The token bucket for ``integration`` (rebuilt when its limits changed)."""
        limit = (integration.rate_per_s, integration.burst)
        if limit != self.limit:
            self.limit = limit
            self.limiter = None
            if integration.rate_per_s > 0:
                # aiolimiter's bucket holds max_rate tokens and refills max_rate per
                # time_period: a token bucket of ``burst`` refilled at ``rate_per_s``.
                burst = max(1, integration.burst)
                self.limiter = AsyncLimiter(burst, burst / integration.rate_per_s)
        return self.limiter


class Dispatcher:
    """Sends offered notifications, one queue and worker per integration id.

    Args:
        config_lookup: the integration of an integration id (None: no longer configured),
            asked at every try so that a reload takes effect.
        submit: takes each ``NotificationSent``/``NotificationFailed`` for the core to
            record; called from the dispatcher's tasks, must not block.
        nc: the NATS connection of the ``nats`` integrations.
        http: the HTTP client of the webhooks, or a factory called once on first use
            (whose client the dispatcher closes when ``run`` ends); None: its own.
        senders: replace or add a ``Sender`` per integration type (e.g. ``email``).
        clock: wall time (``ts`` of the events, ``next_attempt_at``, ``not_before``).
        rng: the jitter of the backoff.
    """

    def __init__(
        self,
        config_lookup: ConfigLookup,
        submit: Submit,
        *,
        nc: NatsClient | None = None,
        http: HttpClient | None = None,
        senders: Mapping[str, Sender] | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._lookup = config_lookup
        self._submit = submit
        self._clock = clock
        self._rng = rng or random.Random()
        self._http_given = http
        self._http: httpx.AsyncClient | None = None
        self._owns_http = False
        self._senders: dict[str, Sender] = {
            "log": LogSender(),
            "nats": NatsSender(nc),
            "webhook": WebhookSender(self._http_client, clock=clock),
            "email": EmailSender(),
            **(senders or {}),
        }
        self._queues: dict[str, _Queue] = {}
        self._pending: set[str] = set()  # notification ids queued or in flight
        self._seq = itertools.count()  # first offered, first sent among equal times
        self._running = False

    # --- the outbox ---------------------------------------------------------------------

    def offer(self, due: NotificationDue, *, attempt: int = 1, not_before: float = 0.0) -> None:
        """Queue ``due`` for its integration (``due.receiver``), to be tried no earlier
        than ``not_before`` as try number ``attempt``. A notification already queued or
        in flight (same ``notification_id``) is ignored."""
        if due.notification_id in self._pending:
            return
        self._pending.add(due.notification_id)
        self._push(due.receiver, _Job(due, attempt, not_before))

    def pending(self) -> int:
        """How many notifications are queued or in flight."""
        return len(self._pending)

    async def run(self, stop: asyncio.Event) -> None:
        """Work every integration's queue until ``stop`` is set; never raises because of
        a receiver. What is still queued then stays queued (for another ``run``)."""
        await preload()  # httpx's first-use imports, off the event loop
        self._running = True
        try:
            for integration_id, queue in self._queues.items():
                self._start(integration_id, queue)
            await stop.wait()
        finally:
            self._running = False
            await self._stop_workers()
            await self._close_http()

    async def notify_out_of_band(self, due: NotificationDue) -> list[str]:
        """Send ``due`` at once through its ``log`` and ``nats`` integrations only, for when
        nothing can be recorded (the event log is down): no queue, no retry, nothing
        submitted. ``due.receiver`` is an integration id, or a receiver name for all of
        its integrations. Returns the integration ids that took it."""
        reached: list[str] = []
        for integration_id, integration in self._targets(due.receiver):
            if integration.type not in OUT_OF_BAND_TYPES:
                continue
            delivery = await self._send(integration_id, integration, due)
            if delivery.ok:
                reached.append(integration_id)
            else:
                log.warning(
                    "alerts.out_of_band_failed",
                    notification_id=due.notification_id,
                    receiver=integration_id,
                    error=delivery.reason,
                )
        return reached

    # --- one worker per integration -----------------------------------------------------

    def _push(self, integration_id: str, job: _Job) -> None:
        queue = self._queues.get(integration_id)
        if queue is None:
            queue = self._queues[integration_id] = _Queue()
        heapq.heappush(queue.heap, (job.not_before, next(self._seq), job))
        queue.wake.set()
        if self._running:
            self._start(integration_id, queue)

    def _start(self, integration_id: str, queue: _Queue) -> None:
        if queue.task is None or queue.task.done():
            queue.task = asyncio.create_task(
                self._work(integration_id, queue), name=f"notify {integration_id}"
            )

    async def _work(self, integration_id: str, queue: _Queue) -> None:
        while True:
            job = await self._next_job(queue)
            try:
                await self._attempt(integration_id, queue, job)
            except asyncio.CancelledError:
                # Stopped mid-try: keep the job for the next run (the receiver may have
                # it already; the notification id makes the repeat harmless).
                heapq.heappush(queue.heap, (job.not_before, next(self._seq), job))
                raise
            except Exception:  # a bug here must not end this integration's deliveries
                log.exception("alerts.dispatch_error", receiver=integration_id)
                self._pending.discard(job.due.notification_id)

    async def _next_job(self, queue: _Queue) -> _Job:
        """The soonest job, once its time has come (waking early for a newly queued one)."""
        while True:
            queue.wake.clear()
            if queue.heap:
                delay = queue.heap[0][0] - self._clock()
                if delay <= 0:
                    return heapq.heappop(queue.heap)[2]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(delay, MAX_WAIT_S)):
                        await queue.wake.wait()
            else:
                await queue.wake.wait()

    async def _attempt(self, integration_id: str, queue: _Queue, job: _Job) -> None:
        due, attempt = job.due, job.attempt
        integration = self._lookup(integration_id)
        if integration is None:
            reason = f"integration {integration_id} is no longer configured"
            self._failed(due, attempt, reason, now=self._clock())
            return
        limiter = queue.throttle(integration)
        if limiter is not None:
            await limiter.acquire()
        delivery = await self._send(integration_id, integration, due)
        now = self._clock()
        if delivery.ok:
            faults.point("notification_sent_unrecorded")
            self._pending.discard(due.notification_id)
            self._submit(
                NotificationSent(
                    event_id=f"{due.notification_id}.sent",
                    tenant=HUB_TENANT,
                    ts=now,
                    notification_id=due.notification_id,
                    receiver=due.receiver,
                    attempt=attempt,
                    detail=delivery.reason,
                )
            )
            return
        delay = self._retry_delay(integration, attempt, delivery)
        if delay is None:
            reason = delivery.reason
            if delivery.outcome == "retry":
                reason += f" (given up after {attempt} attempt{'s' if attempt > 1 else ''})"
            self._failed(due, attempt, reason, now=now)
            return
        self._submit(self._failure(due, attempt, delivery.reason, now=now, next_at=now + delay))
        job = _Job(due, attempt + 1, now + delay)
        heapq.heappush(queue.heap, (job.not_before, next(self._seq), job))

    def _retry_delay(
        self, integration: Integration, attempt: int, delivery: Delivery
    ) -> float | None:
        """Seconds until the next try (None: give up)."""
        if delivery.outcome == "permanent" or attempt >= integration.max_attempts:
            return None
        if delivery.retry_after is not None:
            return min(max(0.0, delivery.retry_after), MAX_RETRY_AFTER_S)
        return backoff_delay(integration, attempt, self._rng)

    def _failed(self, due: NotificationDue, attempt: int, reason: str, *, now: float) -> None:
        """Give ``due`` up and say so."""
        self._pending.discard(due.notification_id)
        self._submit(self._failure(due, attempt, reason, now=now, next_at=0.0))

    def _failure(
        self, due: NotificationDue, attempt: int, reason: str, *, now: float, next_at: float
    ) -> NotificationFailed:
        return NotificationFailed(
            event_id=f"{due.notification_id}.failed.{attempt}",
            tenant=HUB_TENANT,
            ts=now,
            notification_id=due.notification_id,
            receiver=due.receiver,
            attempt=attempt,
            error=reason,
            next_attempt_at=next_at,
        )

    # --- sending ------------------------------------------------------------------------

    async def _send(
        self, integration_id: str, integration: Integration, due: NotificationDue
    ) -> Delivery:
        """One try through the sender of the integration's type; an exception is a
        failure worth another try (and logged: it is a bug, not the receiver)."""
        sender = self._senders.get(integration.type)
        if sender is None:
            return permanent(f"no sender for integration type {integration.type!r}")
        receiver_name = integration_id.partition("/")[0]
        try:
            body = msgspec.json.encode(render(due, receiver_name=receiver_name))
            return await sender.send(integration, due, body)
        except Exception as exc:
            log.exception("alerts.sender_error", receiver=integration_id)
            return retryable(f"{type(exc).__name__}: {exc}")

    def _targets(self, receiver: str) -> Iterator[tuple[str, Integration]]:
        """``(integration id, integration)`` of an integration id, or of each integration
        of a receiver name (ids are ``<name>/<type>/<index>``, indexes from 0, no gaps)."""
        if "/" in receiver:
            integration = self._lookup(receiver)
            if integration is not None:
                yield receiver, integration
            return
        for index in itertools.count():
            found = False
            for kind in get_args(ReceiverType):
                integration_id = f"{receiver}/{kind}/{index}"
                integration = self._lookup(integration_id)
                if integration is not None:
                    found = True
                    yield integration_id, integration
            if not found:
                return

    def _http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            given = self._http_given
            if isinstance(given, httpx.AsyncClient):
                self._http = given
            else:
                self._http = given() if given is not None else httpx.AsyncClient()
                self._owns_http = True
        return self._http

    async def _close_http(self) -> None:
        client, self._http = self._http, None
        if client is not None and self._owns_http:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await client.aclose()

    async def _stop_workers(self) -> None:
        tasks = [q.task for q in self._queues.values() if q.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        for queue in self._queues.values():
            queue.task = None


def backoff_delay(integration: Integration, attempt: int, rng: random.Random) -> float:
    """Seconds before try ``attempt + 1``: ``backoff_s`` doubled per try, at most
    ``max_backoff_s``, with equal jitter (half of it fixed, half random), so that
    notifications failing together do not come back together."""
    ceiling = min(integration.max_backoff_s, integration.backoff_s * 2.0 ** min(attempt - 1, 60))
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)
