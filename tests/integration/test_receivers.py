"""The notification dispatcher against real receivers: a local HTTP server playing the
webhook (``webhook_sink``) and a real NATS server. What each try submits for the core
to record, retries as the receiver asks, one integration never holding up another,
the token bucket, idempotent offers, and sending out of band while nothing can be
recorded."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import nats
import pytest
from nats.aio.msg import Msg
from structlog.testing import capture_logs

from events.model import Event, NotificationDue, NotificationFailed, NotificationSent
from handlers.alert_rules import AlertingConfig, Integration, Receiver
from hub.alerts.dispatch import Dispatcher
from hub.alerts.receivers import Delivery
from tests.integration.conftest import eventually, notification_to
from tests.integration.webhook_sink import serve_webhook

HOOK = "hook/webhook/0"
FAST = {"backoff_s": 0.05, "max_backoff_s": 0.2}  # quick retries where the delay is not the point


@dataclass
class Outbox:
    """A running dispatcher and what it submitted, with ``time.monotonic()`` of each."""

    dispatcher: Dispatcher
    submitted: list[tuple[float, Event]] = field(default_factory=list)

    def of(self, nid: str) -> list[Event]:
        return [e for _, e in self.submitted if getattr(e, "notification_id", None) == nid]

    def sent(self, nid: str) -> NotificationSent | None:
        return next((e for e in self.of(nid) if isinstance(e, NotificationSent)), None)

    def failed(self, nid: str) -> list[NotificationFailed]:
        return [e for e in self.of(nid) if isinstance(e, NotificationFailed)]

    def given_up(self, nid: str) -> NotificationFailed | None:
        return next((e for e in self.failed(nid) if e.next_attempt_at == 0), None)

    def at(self, event: Event) -> float:
        return next(t for t, e in self.submitted if e is event)


@contextlib.asynccontextmanager
async def running(*receivers: Receiver, nc: nats.NATS | None = None) -> AsyncIterator[Outbox]:
    config = AlertingConfig(receivers=receivers)
    outbox: Outbox | None = None

    def submit(event: Event) -> None:
        assert outbox is not None
        outbox.submitted.append((time.monotonic(), event))

    outbox = Outbox(Dispatcher(config.integration, submit, nc=nc, rng=random.Random(1)))
    stop = asyncio.Event()
    task = asyncio.create_task(outbox.dispatcher.run(stop))
    try:
        yield outbox
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)  # and re-raises whatever run raised


def webhook(url: str, **settings: object) -> Receiver:
    return Receiver(name="hook", integrations=(Integration(type="webhook", url=url, **settings),))  # type: ignore[arg-type]


@pytest.fixture
async def alerts_subscriber(nats_server) -> AsyncIterator[list[tuple[float, Msg]]]:
    """What a service subscribed to ``hub.alerts.>`` receives (with ``time.monotonic()``)."""
    client = await nats.connect(nats_server.url)
    got: list[tuple[float, Msg]] = []

    async def on_message(msg: Msg) -> None:
        got.append((time.monotonic(), msg))

    await client.subscribe("hub.alerts.>", cb=on_message)
    await client.flush()
    yield got
    await client.close()


async def test_a_webhook_that_answers_2xx_gets_one_try_and_one_sent_is_submitted():
    """One POST of the webhook body with the notification id as ``Idempotency-Key`` and
    the integration's headers; then ``NotificationSent`` (attempt 1) for the core."""
    async with serve_webhook() as sink:
        receiver = webhook(sink.url(), headers={"X-Token": "abc"})
        async with running(receiver) as outbox:
            outbox.dispatcher.offer(notification_to(1, HOOK))
            sent = await eventually(lambda: outbox.sent("n-1"))
    assert (sent.event_id, sent.receiver, sent.attempt, sent.detail) == (
        "n-1.sent",
        HOOK,
        1,
        "HTTP 200",
    )
    assert [type(e) for _, e in outbox.submitted] == [NotificationSent]
    [request] = sink.requests
    assert request.method == "POST"
    assert request.headers["idempotency-key"] == "n-1"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-token"] == "abc"
    assert request.body["version"] == "4"
    assert request.body["notificationId"] == "n-1"
    assert request.body["receiver"] == "hook"
    assert request.body["status"] == "firing"


async def test_failures_are_retried_with_the_same_key_and_retry_after_is_honoured():
    """500, 500, 429 with ``Retry-After: 2``, then 200: four tries with one
    ``Idempotency-Key``; a ``NotificationFailed`` per failure saying when the next try is;
    the try after the 429 comes at least 2 s after it; then one ``NotificationSent``."""
    script = [500, 500, (429, {"Retry-After": "2"}), 200]
    async with serve_webhook(script) as sink, running(webhook(sink.url(), **FAST)) as outbox:
        outbox.dispatcher.offer(notification_to(1, HOOK))
        sent = await eventually(lambda: outbox.sent("n-1"))
    assert sink.answered == [500, 500, 429, 200]
    assert {r.headers["idempotency-key"] for r in sink.requests} == {"n-1"}
    assert sink.requests[3].at - sink.requests[2].at >= 2.0
    failed = outbox.failed("n-1")
    assert [(f.event_id, f.attempt, f.error) for f in failed] == [
        ("n-1.failed.1", 1, "HTTP 500"),
        ("n-1.failed.2", 2, "HTTP 500"),
        ("n-1.failed.3", 3, "HTTP 429"),
    ]
    assert all(f.next_attempt_at > f.ts for f in failed)
    assert failed[2].next_attempt_at >= failed[2].ts + 2.0
    assert sent.attempt == 4
    assert outbox.dispatcher.pending() == 0


async def test_a_client_error_is_given_up_at_once():
    """A 400 will be a 400 next time: one try, then ``NotificationFailed`` with
    ``next_attempt_at`` 0 (given up)."""
    async with serve_webhook([400]) as sink, running(webhook(sink.url(), **FAST)) as outbox:
        outbox.dispatcher.offer(notification_to(1, HOOK))
        given_up = await eventually(lambda: outbox.given_up("n-1"))
        assert outbox.dispatcher.pending() == 0
    assert (given_up.attempt, given_up.error) == (1, "HTTP 400")
    assert outbox.failed("n-1") == [given_up]
    assert len(sink.requests) == 1


async def test_a_notification_is_given_up_after_max_attempts():
    """Three tries of a receiver that keeps failing: two failures with a next try, the
    third given up (and said so in its error)."""
    async with serve_webhook([503] * 10) as sink:
        receiver = webhook(sink.url(), max_attempts=3, **FAST)
        async with running(receiver) as outbox:
            outbox.dispatcher.offer(notification_to(1, HOOK))
            given_up = await eventually(lambda: outbox.given_up("n-1"))
            assert outbox.dispatcher.pending() == 0
    assert [f.next_attempt_at > 0 for f in outbox.failed("n-1")] == [True, True, False]
    assert given_up.attempt == 3
    assert given_up.error == "HTTP 503 (given up after 3 attempts)"
    assert len(sink.requests) == 3


async def test_a_stuck_webhook_never_holds_up_a_nats_notification(nc, alerts_subscriber):
    """While the webhook's first try hangs unanswered (then fails), a nats notification
    offered after it reaches a subscriber of ``hub.alerts.>`` and is recorded as sent,
    all before the webhook is tried again."""
    hold = asyncio.Event()
    team = Receiver(name="team", integrations=(Integration(type="nats"),))
    async with (
        serve_webhook([hold, 500, 200]) as sink,
        # A timeout far beyond the wait below: the first try stays in flight until ``hold``.
        running(webhook(sink.url(), timeout_s=120, **FAST), team, nc=nc) as outbox,
    ):
        outbox.dispatcher.offer(notification_to(1, HOOK))
        await eventually(lambda: sink.requests)  # the webhook's first try is in flight
        outbox.dispatcher.offer(notification_to(2, "team/nats/0", tenant="beta"))
        nats_sent = await eventually(lambda: outbox.sent("n-2"), timeout=10)
        assert sink.answered == []  # the webhook has still not been answered
        assert outbox.of("n-1") == []  # and its first try has no outcome yet
        hold.set()
        await eventually(lambda: outbox.sent("n-1"))
    [(received_at, msg)] = alerts_subscriber
    assert msg.subject == "hub.alerts.beta.critical"
    assert msg.headers == {"Hub-Notification-Id": "n-2"}
    assert msgspec.json.decode(msg.data)["notificationId"] == "n-2"
    retry = sink.requests[1]
    assert received_at < retry.at
    assert outbox.at(nats_sent) < retry.at
    assert nats_sent.detail == "published on hub.alerts.beta.critical"


async def test_the_token_bucket_spaces_out_an_integrations_notifications():
    """At 2 per second with a burst of 1, three notifications reach the receiver in the
    order offered, and the third no sooner than about 0.5 s after the first."""
    async with (
        serve_webhook() as sink,
        running(webhook(sink.url(), rate_per_s=2.0, burst=1)) as outbox,
    ):
        for n in (1, 2, 3):
            outbox.dispatcher.offer(notification_to(n, HOOK))
        await eventually(lambda: outbox.sent("n-3"))
    assert [r.notification_id for r in sink.requests] == ["n-1", "n-2", "n-3"]
    assert sink.requests[2].at - sink.requests[0].at >= 0.5


async def test_offering_the_same_notification_again_sends_it_once():
    """An offer of a notification already queued, or in flight, is ignored: the receiver
    sees it once (a later notification of the same queue shows nothing was left)."""
    hold = asyncio.Event()
    async with serve_webhook([hold]) as sink, running(webhook(sink.url())) as outbox:
        first = notification_to(1, HOOK)
        outbox.dispatcher.offer(first)
        outbox.dispatcher.offer(first)  # queued
        await eventually(lambda: sink.requests)
        outbox.dispatcher.offer(first, attempt=2)  # in flight
        hold.set()
        outbox.dispatcher.offer(notification_to(2, HOOK))
        await eventually(lambda: outbox.sent("n-2"))
    assert [r.notification_id for r in sink.requests] == ["n-1", "n-2"]
    assert [e.event_id for _, e in outbox.submitted] == ["n-1.sent", "n-2.sent"]


async def test_an_integration_no_longer_configured_is_given_up():
    """A notification addressed to an integration the configuration no longer has."""
    async with running() as outbox:
        outbox.dispatcher.offer(notification_to(1, "gone/webhook/0"))
        given_up = await eventually(lambda: outbox.given_up("n-1"))
    assert given_up.error == "integration gone/webhook/0 is no longer configured"


class Exploding:
    """A sender with a bug: it raises."""

    async def send(self, integration: Integration, due: NotificationDue, body: bytes) -> Delivery:
        raise RuntimeError("boom")


async def test_a_sender_that_raises_is_a_failed_try_and_the_dispatcher_goes_on():
    """The exception becomes the error of a ``NotificationFailed``; ``run`` does not end
    and other integrations still deliver."""
    receivers = (
        Receiver(name="mail", integrations=(Integration(type="email", max_attempts=1),)),
        Receiver(name="ops", integrations=(Integration(type="log"),)),
    )
    config = AlertingConfig(receivers=receivers)
    submitted: list[Event] = []
    dispatcher = Dispatcher(config.integration, submitted.append, senders={"email": Exploding()})
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    with capture_logs():  # the sender's traceback is logged; keep it out of the output
        dispatcher.offer(notification_to(1, "mail/email/0"))
        await eventually(lambda: submitted)
        dispatcher.offer(notification_to(2, "ops/log/0"))
        await eventually(lambda: len(submitted) == 2)
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    failed, sent = submitted
    assert isinstance(failed, NotificationFailed)
    assert failed.error == "RuntimeError: boom (given up after 1 attempt)"
    assert failed.next_attempt_at == 0.0
    assert isinstance(sent, NotificationSent)
    assert sent.notification_id == "n-2"


async def test_email_is_refused_for_now():
    """The extension point answers a clear, permanent failure."""
    receiver = Receiver(name="mail", integrations=(Integration(type="email"),))
    async with running(receiver) as outbox:
        outbox.dispatcher.offer(notification_to(1, "mail/email/0"))
        given_up = await eventually(lambda: outbox.given_up("n-1"))
    assert given_up.error == "email is not supported yet"


async def test_out_of_band_reaches_nats_and_the_log_and_records_nothing(nc, alerts_subscriber):
    """While the log is down: the receiver's log and nats integrations are told at once,
    its webhook is not, and nothing is submitted (nothing could be recorded)."""
    async with serve_webhook() as sink:
        receiver = Receiver(
            name="default",
            integrations=(
                Integration(type="log"),
                Integration(type="nats"),
                Integration(type="webhook", url=sink.url()),
            ),
        )
        config = AlertingConfig(receivers=(receiver,))
        submitted: list[Event] = []
        dispatcher = Dispatcher(config.integration, submitted.append, nc=nc)
        due = notification_to(7, "default", tenant="_infra")
        with capture_logs() as logs:
            reached = await dispatcher.notify_out_of_band(due)
        one = await dispatcher.notify_out_of_band(notification_to(8, "default/nats/1"))
        assert sink.requests == []  # sent one by one: a webhook try would be done by now
    assert reached == ["default/log/0", "default/nats/1"]
    assert one == ["default/nats/1"]
    assert submitted == []
    [line] = [x for x in logs if x["event"] == "alert_notification"]
    assert line["notification_id"] == "n-7"
    assert line["alertnames"] == ["ServiceUnhealthy"]
    assert (line["firing"], line["resolved"], line["status"]) == (1, 0, "firing")
    await eventually(lambda: len(alerts_subscriber) == 2)
    subjects = [(m.subject, m.headers) for _, m in alerts_subscriber]
    assert subjects == [
        ("hub.alerts._infra.critical", {"Hub-Notification-Id": "n-7"}),
        ("hub.alerts.acme.critical", {"Hub-Notification-Id": "n-8"}),
    ]
