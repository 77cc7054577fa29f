"""The hub's alerting adapter: rules in, notifications out, silences over NATS.

It decides nothing (``handlers.alerting`` does, in the core); it feeds the core and acts
on what the core recorded:

* the rules (``hub.alerts.rules``) are recorded as ``AlertRulesLoaded`` at start when they
  differ from the ones in force, and again on SIGHUP (a bad file is logged, the old rules
  stay);
* every ``NotificationDue`` recorded is handed to the dispatcher (``hub.alerts.dispatch``)
  whose outcomes come back as candidates; after a restart, what was due and not sent is
  offered again from the folded outbox;
* ``hub.alerts.silence`` (create / expire / list) and ``hub.alerts.ack`` are answered by
  request-reply once what they ask is recorded;
* the hub's own gauges (view lag, ingress backlog, dead letters per minute) are sampled
  and recorded as ``HubSampled`` for the rules on them;
* while the event log cannot be written, an alert on it cannot be recorded first: the
  rules on ``event_log_down`` are told straight to the log and NATS integrations once
  their ``for`` and ``group_wait`` ran out, and the outage is recorded (with what was
  said) once the log is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from events.model import (
    AlertAcknowledged,
    AlertRulesLoaded,
    Event,
    HubSampled,
    NotificationDue,
    SilenceCreated,
    SilenceExpired,
)
from events.subjects import ALERTS_ACK_SUBJECT, ALERTS_SILENCE_SUBJECT
from events.wire import StandardResponse, encode_response
from handlers.alert_rules import (
    GAUGES,
    HUB_TENANT,
    AlertingConfig,
    Integration,
    Matcher,
    digest_of,
)
from handlers.alerting import outage_alerts, outage_due_at, outage_notifications
from handlers.core import Outage
from hub import faults
from hub.alerts._syntax import make_matcher, parse_duration, parse_matcher
from hub.alerts.dispatch import Dispatcher
from hub.alerts.rules import ALERTS_FILE_ENV, describe_alerting, load_alerting
from hub.config import HubConfig
from hub.infra.config import load_infra_config
from hub.ingest import Ingest
from hub.metrics import Metrics
from hub.progress import Progress
from hub.status import HubStatus

log = structlog.get_logger(__name__)

S = TypeVar("S")
SAMPLE_EVERY_S = 5.0  # how often the hub's gauges are sampled (and recorded if changed)
REPLY_WAIT_S = 10.0  # a silence request waits this long for its record before it says so


class SilenceRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``hub.alerts.silence``: ``op`` create (matchers, ends_at or duration, created_by,
    comment, starts_at, id), expire (id, expired_by) or list."""

    op: str
    matchers: list[str | dict[str, str]] = []
    starts_at: float | None = None
    ends_at: float | None = None
    duration: str | None = None
    created_by: str = ""
    comment: str = ""
    id: str = ""
    expired_by: str = ""


class AckRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    fingerprint: str
    author: str
    comment: str = ""


class RequestError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Alerting:
    """Runs beside the ingest loop, in the hub process (the writer)."""

    def __init__(
        self,
        config: HubConfig,
        nc: Client,
        ingest: Ingest,
        *,
        status: HubStatus,
        progress: Progress,
        metrics: Metrics,
        views: list[str],
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self._config = config
        self._nc = nc
        self._ingest = ingest
        self._status = status
        self._progress = progress
        self._metrics = metrics
        self._views = views
        self._clock = clock
        self._environ = environ
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._subs: list[Subscription] = []
        self._waiting: dict[str, asyncio.Future[Event]] = {}  # event id -> its record
        self.dispatcher = Dispatcher(self._integration, ingest.submit, nc=nc, clock=clock)
        self._behind_since: dict[str, float] = {}
        self._rejected: list[tuple[float, int]] = []

    @property
    def _state(self) -> Any:
        return self._ingest.state

    def _integration(self, target: str) -> Integration | None:
        config: AlertingConfig = self._state.alerts.config
        return config.integration(target)

    # --- life -----------------------------------------------------------------------------

    def load(self, rules: tuple[AlertingConfig, str] | None = None) -> bool:
        """Record the rules (``rules``: as ``hub.alerts.rules.load_alerting`` read them at
        start; None: read them now) if they differ from the ones in force.

        Raises:
            AlertConfigError: the file is bad (naming the file, the rule and the key).
        """
        if rules is None:
            infra = Path(self._config.infra_config) if self._config.infra_config else None
            rules = load_alerting(self._environ, infra)
        config, source = rules
        digest = digest_of(config)
        if digest == self._state.alerts.digest and self._state.alerts.loaded:
            return False
        now = self._clock()
        self._ingest.submit(AlertRulesLoaded(
            event_id=f"alert-rules.{digest}.{round(now * 1e6)}", tenant=HUB_TENANT, ts=now,
            source=source, digest=digest, config=config.to_data(),
        ))  # fmt: skip
        log.info("alert_rules_loaded", source=source, digest=digest,
                 rules=describe_alerting(config))  # fmt: skip
        return True

    async def start(self) -> None:
        """Serve: send what is due, answer silences, sample, watch the log (``load`` was
        called before the ingest loop started, so the rules in force are the file's)."""
        self._ingest.observe(self._recorded)
        self._rejected = [(self._clock(), self._metrics.get("ingress_rejected"))]
        outbox = self._state.alerts.outbox if self._state.alerts.config.enabled else {}
        for entry in outbox.values():
            self.dispatcher.offer(entry.due, attempt=entry.attempts + 1,
                                  not_before=entry.next_attempt_at)  # fmt: skip
        self._subs.append(await self._nc.subscribe(ALERTS_SILENCE_SUBJECT, cb=self._on_silence))
        self._subs.append(await self._nc.subscribe(ALERTS_ACK_SUBJECT, cb=self._on_ack))
        for coro, name in ((self.dispatcher.run(self._stop), "alert-dispatcher"),
                           (self._sample(), "alert-sampler"),
                           (self._watch_log(), "alert-log-watch")):  # fmt: skip
            self._tasks.append(asyncio.create_task(coro, name=name))

    async def reload(self) -> bool:
        """Re-read the rules (SIGHUP); a bad file is logged and the rules in force stay."""
        try:
            infra = self._config.infra_config
            if infra and not self._environ.get(ALERTS_FILE_ENV, "").strip():
                # The rules come from the infrastructure file: one the monitor refuses
                # (and keeps the old set of) keeps the rules in force as well.
                load_infra_config(infra)
            return self.load()
        except Exception as exc:
            log.error("alert_rules_reload_failed", error=str(exc))
            return False

    async def stop(self) -> None:
        self._stop.set()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=5)
            for t in pending:
                t.cancel()

    # --- what was recorded ------------------------------------------------------------------

    def _recorded(self, events: list[Event]) -> None:
        sending = self._state.alerts.config.enabled
        for e in events:
            if (
                sending
                and isinstance(e, NotificationDue)
                and e.notification_id in (self._state.alerts.outbox)
            ):
                faults.point("notification_due_recorded")
                self.dispatcher.offer(e)
            waiter = self._waiting.pop(e.event_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(e)

    async def _recorded_as(self, event: Event) -> Event:
        """Submit ``event`` and wait until it is recorded."""
        waiter: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._waiting[event.event_id] = waiter
        self._ingest.submit(event)
        try:
            return await asyncio.wait_for(waiter, REPLY_WAIT_S)
        except TimeoutError:
            raise RequestError(
                "NOT_YET_PROCESSED",
                f"not recorded within {REPLY_WAIT_S:g} s (the event log may be down); it will "
                "be when the log can be written",
            ) from None
        finally:
            self._waiting.pop(event.event_id, None)

    # --- silences and acknowledgements ----------------------------------------------------------

    async def _on_silence(self, msg: Msg) -> None:
        await self._answer(msg, lambda: self._silence(msg.data))

    async def _on_ack(self, msg: Msg) -> None:
        await self._answer(msg, lambda: self._ack(msg.data))

    async def _answer(self, msg: Msg, work: Callable[[], Any]) -> None:
        began = time.perf_counter()
        try:
            response = StandardResponse(success=True, data=await work())
        except RequestError as exc:
            response = StandardResponse(success=False, error_code=exc.code,
                                        error_message=str(exc))  # fmt: skip
        except Exception as exc:  # a bug: the requester hears of it, the hub goes on
            log.exception("alert_request_failed", subject=msg.subject)
            response = StandardResponse(success=False, error_code="INTERNAL_ERROR",
                                        error_message=repr(exc))  # fmt: skip
        response.processing_time_ms = round((time.perf_counter() - began) * 1000, 3)
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(encode_response(response))

    async def _silence(self, payload: bytes) -> Any:
        request = _decode(payload, SilenceRequest)
        now = self._clock()
        match request.op:
            case "create":
                matchers = [_matcher(m) for m in request.matchers]
                if not matchers:
                    raise RequestError("INVALID_REQUEST", "a silence needs at least one matcher")
                starts = request.starts_at if request.starts_at is not None else now
                if request.ends_at is not None:
                    ends = request.ends_at
                elif request.duration:
                    try:
                        ends = starts + parse_duration(request.duration)
                    except ValueError as exc:
                        raise RequestError("INVALID_REQUEST", f"duration: {exc}") from None
                else:
                    raise RequestError("INVALID_REQUEST", "give ends_at or duration")
                if ends <= starts or ends <= now:
                    raise RequestError("INVALID_REQUEST", "the silence ends before it starts, "
                                       "or is over already")  # fmt: skip
                if not request.created_by:
                    raise RequestError("INVALID_REQUEST", "created_by: who creates the silence")
                silence_id = request.id or uuid.uuid4().hex[:16]
                if silence_id in self._state.alerts.silences:
                    raise RequestError("CONFLICT", f"silence {silence_id} exists")
                created = await self._recorded_as(SilenceCreated(
                    event_id=f"silence.{silence_id}.created", tenant=HUB_TENANT, ts=now,
                    silence_id=silence_id, matchers=[m.to_data() for m in matchers],
                    starts_at=starts, ends_at=ends, created_by=request.created_by,
                    comment=request.comment,
                ))  # fmt: skip
                return msgspec.to_builtins(created)
            case "expire":
                if request.id not in self._state.alerts.silences:
                    raise RequestError("NOT_FOUND", f"no active silence {request.id!r}")
                expired = await self._recorded_as(SilenceExpired(
                    event_id=f"silence.{request.id}.expired", tenant=HUB_TENANT, ts=now,
                    silence_id=request.id, reason="expired", expired_by=request.expired_by,
                ))  # fmt: skip
                return msgspec.to_builtins(expired)
            case "list":
                return [
                    {"silence_id": s.silence_id, "matchers": [m.to_data() for m in s.matchers],
                     "starts_at": s.starts_at, "ends_at": s.ends_at, "created_by": s.created_by,
                     "comment": s.comment, "active": s.active(now)}
                    for s in sorted(self._state.alerts.silences.values(),
                                    key=lambda s: s.starts_at)
                ]  # fmt: skip
            case _:
                raise RequestError(
                    "INVALID_REQUEST", f"op: expected create, expire or list, got {request.op!r}"
                )

    async def _ack(self, payload: bytes) -> Any:
        request = _decode(payload, AckRequest)
        alert = self._state.alerts.alerts.get(request.fingerprint)
        if alert is None:
            raise RequestError("NOT_FOUND", f"no active alert {request.fingerprint!r}")
        now = self._clock()
        acked = await self._recorded_as(AlertAcknowledged(
            event_id=f"alert.{alert.fingerprint}.{round(alert.active_since * 1e6)}.ack."
                     f"{round(now * 1e6)}",
            tenant=alert.labels.get("tenant", HUB_TENANT), ts=now,
            fingerprint=alert.fingerprint, author=request.author, comment=request.comment,
        ))  # fmt: skip
        return msgspec.to_builtins(acked)

    # --- the hub's own gauges -------------------------------------------------------------------

    async def _sample(self) -> None:
        last: dict[str, float] = {}
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), SAMPLE_EVERY_S)
            if self._stop.is_set() or self._status.log_stalled_since is not None:
                continue
            config: AlertingConfig = self._state.alerts.config
            if not config.enabled or not any(r.source in GAUGES for r in config.rules):
                continue  # no rule needs them: nothing to record
            try:
                values = await self.gauges()
            except Exception as exc:  # not worth stopping the hub for
                log.info("hub_sample_failed", error=repr(exc))
                continue
            if values != last:
                last = values
                now = self._clock()
                sample = HubSampled(event_id=f"sample.{round(now * 1e6)}", tenant=HUB_TENANT,
                                    ts=now, values=values)  # fmt: skip
                self._ingest.submit(sample)

    async def gauges(self) -> dict[str, float]:
        """The hub's gauges now (``handlers.alert_rules.GAUGES``)."""
        now = self._clock()
        lag_records = max((self._progress.lag(v) for v in self._views), default=0)
        for v in self._views:
            if self._progress.up_to_date(v):
                self._behind_since.pop(v, None)
            else:
                self._behind_since.setdefault(v, now)
        lag_s = max((now - t for t in self._behind_since.values()), default=0.0)
        backlog = await self._ingest.backlog()
        rejected = self._metrics.get("ingress_rejected")
        # Dead letters over the last minute: the count now less the oldest count kept
        # from within the minute (or from the start, for a hub up for less than one).
        kept = [(t, n) for t, n in self._rejected if t >= now - 60]
        self._rejected = (kept or self._rejected[-1:]) + [(now, rejected)]
        per_min = rejected - self._rejected[0][1]
        return {
            "projection_lag_records": float(lag_records),
            "projection_lag_s": round(lag_s, 1),
            "ingress_pending": float(backlog["pending"] + backlog["ack_pending"]),
            "ingress_oldest_age_s": round(float(backlog["oldest_age_s"]), 1),
            "dead_letters_per_min": float(per_min),
        }

    # --- the event log down -----------------------------------------------------------------------

    async def _watch_log(self) -> None:
        """While the log cannot be written: tell out of band when the rules on it say so;
        once it can, record the outage."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.2)
            since = self._status.log_stalled_since
            if since is None or self._stop.is_set():
                continue
            reached: dict[str, list[str]] = {}
            said: set[str] = set()
            while self._status.log_stalled_since is not None and not self._stop.is_set():
                now = self._clock()
                for alert in outage_alerts(self._state, self._status.event_log, since):
                    if alert.fingerprint in said or now < outage_due_at(self._state, alert):
                        continue
                    said.add(alert.fingerprint)
                    for due in outage_notifications(self._state, alert):
                        took = await self.dispatcher.notify_out_of_band(due)
                        if took:
                            reached[due.notification_id] = took
                    log.error("event_log_down_told_out_of_band", event_log=self._status.event_log,
                              alert=alert.rule, since=since, reached=sorted(reached))  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.2)
            if self._stop.is_set():
                return
            self._ingest.submit(Outage(self._status.event_log, since, self._clock(), reached))


def _decode(payload: bytes, kind: type[S]) -> S:
    try:
        return msgspec.json.decode(payload or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise RequestError("INVALID_REQUEST", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise RequestError("MALFORMED_JSON", str(exc)) from None


def _matcher(raw: str | dict[str, str]) -> Matcher:
    try:
        if isinstance(raw, str):
            return parse_matcher(raw)
        return make_matcher(raw.get("name", ""), raw.get("op", "="), raw.get("value", ""))
    except ValueError as exc:
        raise RequestError("INVALID_REQUEST", f"matchers: {exc}") from None
