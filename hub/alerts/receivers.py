"""Sending one notification through one integration: a ``Sender`` per integration type.

Every sender answers with a ``Delivery`` and never raises for what the receiver did
(a refused connection, a timeout, an HTTP 500 are outcomes, not errors): ``ok`` (the
receiver has it), ``retry`` (try again later, at ``retry_after`` seconds if the receiver
said) or ``permanent`` (trying again will not help). Whether and when to try again is
the dispatcher's decision (``hub.alerts.dispatch``).

* ``log``: a structlog line ``alert_notification``;
* ``nats``: the JSON body on ``hub.alerts.<tenant>.<severity>``, flushed, so that "sent"
  means the server has it;
* ``webhook``: an HTTP POST of the JSON body with ``Idempotency-Key: <notification id>``,
  the same on every try, so a receiver can drop a repeat (a crash between its answer
  and our record of it makes one);
* ``email``: not supported yet (refused, permanently); another ``Sender`` can take its
  place.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Literal, Protocol

import httpx
import msgspec
import structlog
from nats.aio.client import Client as NatsClient

from events.model import NotificationDue
from handlers.alert_rules import Integration
from hub.alerts.payload import alertnames, subject_for
from hub.infra.checkers import describe_error

log = structlog.get_logger(__name__)

NOTIFICATION_ID_HEADER = "Hub-Notification-Id"  # on a nats notification
IDEMPOTENCY_HEADER = "Idempotency-Key"  # on a webhook request
USER_AGENT = "central-hub-alerts"
# Statuses worth another try: the server may answer otherwise later (RFC 9110, 6585, 8470).
RETRYABLE_STATUSES = frozenset({408, 425, 429})
REASON_LIMIT_CHARS = 200


class Delivery(msgspec.Struct, frozen=True):
    """How one try went. ``reason``: a short text for a person (the error, or a detail of
    success); ``retry_after``: seconds the receiver asked us to wait (``retry`` only)."""

    outcome: Literal["ok", "retry", "permanent"]
    reason: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def delivered(detail: str = "") -> Delivery:
    return Delivery("ok", detail)


def retryable(reason: str, retry_after: float | None = None) -> Delivery:
    return Delivery("retry", _short(reason), retry_after)


def permanent(reason: str) -> Delivery:
    return Delivery("permanent", _short(reason))


class Sender(Protocol):
    """Sends a notification through one type of integration (the port)."""

    async def send(self, integration: Integration, due: NotificationDue, body: bytes) -> Delivery:
        """Send ``body`` (the rendered ``due``) through ``integration``; never raises for
        what the receiver does."""
        ...


class LogSender:
    """A structlog line per notification (warning while firing, info once resolved):
    always delivered."""

    async def send(self, integration: Integration, due: NotificationDue, body: bytes) -> Delivery:
        emit = log.warning if due.firing else log.info
        emit(
            "alert_notification",
            notification_id=due.notification_id,
            receiver=due.receiver,
            status="firing" if due.firing else "resolved",
            severity=due.severity,
            group=due.group_labels,
            group_key=due.group_key,
            alertnames=alertnames(due),
            firing=len(due.firing),
            resolved=len(due.resolved),
            epoch=due.epoch,
        )
        return delivered("logged")


class NatsSender:
    """Publishes on ``hub.alerts.<tenant>.<severity>`` and flushes (the server has it)."""

    def __init__(self, nc: NatsClient | None) -> None:
        self._nc = nc

    async def send(self, integration: Integration, due: NotificationDue, body: bytes) -> Delivery:
        if self._nc is None:
            return permanent("no NATS connection was given to the dispatcher")
        if not self._nc.is_connected:
            return retryable("NATS is not connected")
        subject = subject_for(due)
        try:
            await self._nc.publish(
                subject, body, headers={NOTIFICATION_ID_HEADER: due.notification_id}
            )
            await self._nc.flush(timeout=integration.timeout_s)  # type: ignore[arg-type]
        except Exception as exc:  # the connection dropped, the flush timed out...
            return retryable(f"NATS: {describe_error(exc, integration.timeout_s)}")
        return delivered(f"published on {subject}")


class WebhookSender:
    """POSTs the JSON body; 2xx is delivered, 408/425/429/5xx and network errors are worth
    another try (``Retry-After`` honoured), any other answer is permanent."""

    def __init__(
        self,
        client: Callable[[], httpx.AsyncClient],
        *,
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self._client = client
        self._clock = clock
        self._environ = environ

    async def send(self, integration: Integration, due: NotificationDue, body: bytes) -> Delivery:
        if not integration.url:
            return permanent("webhook has no url")
        # Secrets (a token in the url or a header) are written ${NAME} in the rules, which
        # the log records; their values come from the environment here, at each send.
        try:
            secrets: dict[str, str] = {}
            url = expand(integration.url, self._environ, secrets)
            given = {k: expand(v, self._environ, secrets) for k, v in integration.headers.items()}
        except KeyError as exc:
            return permanent(f"the environment variable {exc.args[0]} named in the webhook's "
                             "url or headers is not set")  # fmt: skip
        headers = {
            **given,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            IDEMPOTENCY_HEADER: due.notification_id,
        }
        timeout = integration.timeout_s
        request = self._client().stream("POST", url, content=body, headers=headers,
                                        timeout=timeout)  # fmt: skip
        try:
            # httpx's timeout bounds each step; this bounds the whole request.
            async with asyncio.timeout(timeout), request as response:
                status = response.status_code
                retry_after = response.headers.get("Retry-After")
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            return permanent(redact(f"bad webhook url: {exc}", secrets))
        except (TimeoutError, httpx.HTTPError, OSError) as exc:
            return retryable(redact(describe_error(exc, timeout), secrets))
        return classify(status, retry_after, now=self._clock())


_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand(text: str, environ: Mapping[str, str], secrets: dict[str, str]) -> str:
    """``text`` with each ``${NAME}`` replaced by ``environ[NAME]`` (KeyError: not set);
    ``secrets`` collects ``value -> ${NAME}``, to take the values out of error messages."""

    def value(m: re.Match[str]) -> str:
        found = environ[m.group(1)]
        if found:
            secrets[found] = m.group(0)
        return found

    return _REFERENCE.sub(value, text)


def redact(text: str, secrets: Mapping[str, str]) -> str:
    """``text`` with every secret value put back as the ``${NAME}`` it came from."""
    for found, reference in secrets.items():
        text = text.replace(found, reference)
    return text


class EmailSender:
    """The extension point for email: refused until someone writes a real one."""

    async def send(self, integration: Integration, due: NotificationDue, body: bytes) -> Delivery:
        return permanent("email is not supported yet")


def classify(status: int, retry_after: str | None, *, now: float) -> Delivery:
    """The outcome of an HTTP answer with ``status`` and a ``Retry-After`` header."""
    if 200 <= status < 300:
        return delivered(f"HTTP {status}")
    if status in RETRYABLE_STATUSES or 500 <= status < 600:
        return retryable(f"HTTP {status}", parse_retry_after(retry_after, now=now))
    if 300 <= status < 400:
        return permanent(f"HTTP {status} (redirects are not followed)")
    return permanent(f"HTTP {status}")


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP-date
    (RFC 9110 10.2.3); None when absent or unreadable; never negative."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": UTC by RFC 5322
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now)


def _short(text: str) -> str:
    return text if len(text) <= REASON_LIMIT_CHARS else text[: REASON_LIMIT_CHARS - 1] + "…"
