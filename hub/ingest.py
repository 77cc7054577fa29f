"""The ingest loop: ingress stream -> validate -> handlers -> event log -> ack.

Every ingress message becomes exactly one recorded event (a registration,
heartbeat, deregistration, or an ``InputRejected``), whose id is derived from
the ingress sequence, plus what the handlers derive from it (a health change).
Messages are acknowledged only after their events are in the log. After a crash
the hub rebuilds its state from the log; the ledger of recorded ingress
sequences tells which re-delivered messages are already recorded.

The same loop runs the lease timer (``handlers.liveness.tick``) between
batches, so timer decisions and ingress decisions are taken one at a time on
one state and recorded in the order they were taken.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from events.codec import encode_event
from events.log import advance
from events.model import (
    WATCH_KIND,
    Event,
    HeartbeatReceived,
    InfraChecked,
    InputRejected,
    ServiceDeregistered,
    ServiceRegistered,
)
from events.names import INVALID_TENANT
from events.subjects import (
    DLQ_STREAM,
    DLQ_SUBJECT,
    INGRESS_CONSUMER,
    INGRESS_STREAM,
    INGRESS_SUBJECTS,
    route,
    watch_subject,
)
from events.wire import (
    DeregisterMessage,
    HeartbeatMessage,
    RegisterMessage,
    WireError,
    derive_instance_id,
    parse_ingress,
)
from handlers import RegistryState, evolve, react, tick
from hub.config import HubConfig
from hub.eventlog.port import EventLog
from hub.metrics import Metrics
from hub.progress import Progress
from hub.tail import LogTail

log = structlog.get_logger(__name__)

EXCERPT_BYTES = 256
YIELD_EVERY = 500  # messages decided between two turns of the event loop
# Pushed to watchers on hub.events.<tenant>.<kind>: everything but heartbeats and
# infrastructure check results (the bulk; a change they cause is announced as such).
ANNOUNCED = frozenset(t for t in WATCH_KIND if t not in (HeartbeatReceived, InfraChecked))


def ingress_stream_config(config: HubConfig) -> StreamConfig:
    """``HUB_INGRESS``: durable, work-queue, refusing oversized input at the door."""
    return StreamConfig(
        name=INGRESS_STREAM,
        subjects=INGRESS_SUBJECTS,
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_msg_size=config.max_message_bytes,
        discard=DiscardPolicy.NEW,
        max_bytes=4 * 1024**3,
    )


def ingress_consumer_config() -> ConsumerConfig:
    """The hub's durable pull consumer of ``HUB_INGRESS``."""
    return ConsumerConfig(
        durable_name=INGRESS_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=60.0,
        max_deliver=-1,
        max_ack_pending=20_000,
    )


async def ingress_first_seq(nc: Client) -> int:
    """The first sequence still in the ingress stream (0 if there is no stream yet)."""
    try:
        info = await nc.jetstream().stream_info(INGRESS_STREAM)
    except nats.js.errors.NotFoundError:
        return 0
    return int(info.state.first_seq)


@dataclass(frozen=True)
class Rejection:
    """A dead letter to publish: the original bytes and why they were refused."""

    event: InputRejected
    payload: bytes


def to_event(
    msg: RegisterMessage | HeartbeatMessage | DeregisterMessage, *, tenant: str, seq: int, ts: float
) -> Event:
    """The candidate event for a valid ingress message (pure)."""
    eid = f"ingress-{seq}"
    match msg:
        case RegisterMessage():
            return ServiceRegistered(
                event_id=eid, tenant=tenant, ts=ts, ingress_seq=seq,
                service_name=msg.service_name,
                instance_id=msg.instance_id
                or derive_instance_id(msg.service_name, msg.host, msg.port),
                host=msg.host, port=msg.port, protocol=msg.protocol, version=msg.version,
                health_endpoint=msg.health_endpoint, metadata=dict(msg.metadata),
                transport_preferences=list(msg.transport_preferences),
                heartbeat_interval_s=msg.heartbeat_interval_s, depends_on=list(msg.depends_on),
                ttl_s=msg.ttl_s or 0.0, expire_after_s=msg.expire_after_s or 0.0,
            )  # fmt: skip
        case HeartbeatMessage():
            return HeartbeatReceived(
                event_id=eid, tenant=tenant, ts=ts, ingress_seq=seq,
                service_name=msg.service_name, instance_id=msg.instance_id,
                status=msg.status, load=msg.load, checks=dict(msg.checks),
            )  # fmt: skip
        case DeregisterMessage():
            return ServiceDeregistered(
                event_id=eid, tenant=tenant, ts=ts, ingress_seq=seq,
                service_name=msg.service_name, instance_id=msg.instance_id,
            )  # fmt: skip


def printable(data: bytes | str, limit: int = EXCERPT_BYTES) -> str:
    """Text safe to store anywhere (PostgreSQL refuses NUL): bad bytes escaped."""
    if isinstance(data, bytes):
        data = data[:limit].decode("utf-8", errors="backslashreplace")
    return data[:limit].replace("\x00", "\\x00")


def rejected(
    *, tenant: str, seq: int, ts: float, subject: str, code: str, reason: str, payload: bytes
) -> InputRejected:
    return InputRejected(
        event_id=f"ingress-{seq}", tenant=tenant, ts=ts, ingress_seq=seq,
        subject=printable(subject), reason_code=code, reason=printable(reason, 2048),
        excerpt=printable(payload),
    )  # fmt: skip


# Routes are immutable and subjects few (a kind per tenant): parse each once.
_route = functools.lru_cache(maxsize=4096)(route)


def classify(config: HubConfig, subject: str, payload: bytes, *, seq: int, ts: float) -> Event:
    """Turn one ingress message into its candidate event, or an InputRejected (pure)."""
    r = _route(subject)
    if r.tenant_error is not None:
        return rejected(tenant=INVALID_TENANT, seq=seq, ts=ts, subject=subject,
                        code="INVALID_TENANT", reason=r.tenant_error, payload=payload)  # fmt: skip
    if not config.tenant_allowed(r.tenant):
        return rejected(tenant=INVALID_TENANT, seq=seq, ts=ts, subject=subject,
                        code="UNKNOWN_TENANT", reason=f"tenant {r.tenant!r} is not served here",
                        payload=payload)  # fmt: skip
    try:
        msg = parse_ingress(r.kind, payload, max_metadata_bytes=config.max_metadata_bytes)
    except WireError as exc:
        return rejected(tenant=r.tenant, seq=seq, ts=ts, subject=subject, code=exc.code,
                        reason=exc.reason, payload=payload)  # fmt: skip
    return to_event(msg, tenant=r.tenant, seq=seq, ts=ts)


def ack_metadata(reply: str) -> tuple[int, float, int]:
    """(stream sequence, timestamp, pending) of a JetStream message, from its reply
    subject: what nats-py's ``Msg.metadata`` gives (the same timestamp, to the
    microsecond), without building its objects for every message.

    Raises:
        ValueError: not a JetStream message's reply subject.
    """
    t = reply.split(".")
    if t[:2] != ["$JS", "ACK"] or len(t) not in (9, 11, 12):
        raise ValueError(f"not a JetStream reply subject: {reply!r}")
    seq, ns, pending = (t[5], t[7], t[8]) if len(t) == 9 else (t[7], t[9], t[10])
    # datetime.fromtimestamp(s).timestamp() without the objects: whole seconds plus
    # microseconds rounded half to even, carried into the seconds at 1e6.
    frac, whole = math.modf(int(ns) / 1e9)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        micros -= 1_000_000
        whole += 1.0
    return int(seq), (int(whole) * 1_000_000 + micros) / 1_000_000, int(pending)


# Counter names by event type (an f-string per message adds up).
_COUNTERS = {t: f"ingress_{t.__name__}" for t in WATCH_KIND}


class Ingest:
    """Consumes ``HUB_INGRESS`` durably in batches and records events in the log."""

    def __init__(
        self,
        nc: Client,
        event_log: EventLog,
        state: RegistryState,
        config: HubConfig,
        *,
        metrics: Metrics,
        progress: Progress,
        clock: Callable[[], float] = time.time,
        tail: LogTail | None = None,
    ) -> None:
        self._nc = nc
        self._tail = tail
        self._js = nc.jetstream()
        self._log = event_log
        self.state = state
        self._config = config
        self._metrics = metrics
        self._progress = progress
        self._clock = clock
        self._batches = 0
        # Leases run from the hub's start at the earliest (see liveness.lease_deadline).
        self.started_at = clock()
        self._last_tick = 0.0
        self._caught_up = False
        self._internal: list[Event] = []  # candidates from inside the hub (monitor results)

    async def setup(self) -> None:
        """Create the ingress and dead-letter streams and the durable consumer."""
        await self._ensure_stream(ingress_stream_config(self._config))
        await self._ensure_stream(
            StreamConfig(
                name=DLQ_STREAM,
                subjects=[DLQ_SUBJECT],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=30 * 24 * 3600.0,
                duplicate_window=600.0,
            )
        )
        await self._take_over_consumer()
        await self._compact_ledger()

    async def _take_over_consumer(self) -> None:
        """Create the durable consumer, or take it over from a previous hub process.

        Messages a crashed hub had fetched but not acknowledged would otherwise be
        held back until their ack wait expires. The hub is the single writer of its
        ingress stream, so it recreates the consumer: with work-queue retention the
        unacknowledged messages stay in the stream and come again at once, in order.
        """
        config = ingress_consumer_config()
        try:
            info = await self._js.consumer_info(INGRESS_STREAM, INGRESS_CONSUMER)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None and info.num_ack_pending:
            log.info("ingress_consumer_taken_over", unacknowledged=info.num_ack_pending)
            await self._js.delete_consumer(INGRESS_STREAM, INGRESS_CONSUMER)
        await self._js.add_consumer(INGRESS_STREAM, config)

    async def _ensure_stream(self, config: StreamConfig) -> None:
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await self._js.update_stream(config)

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self._js.pull_subscribe_bind(INGRESS_CONSUMER, stream=INGRESS_STREAM)
        tick_s = self._config.tick_s

        async def fetch() -> list[Msg] | None:
            """The next batch; [] when nothing came within tick_s; None: connection closed."""
            try:
                return await sub.fetch(self._config.ingest_batch, timeout=tick_s)
            except (TimeoutError, nats.errors.TimeoutError):
                return []
            except nats.errors.ConnectionClosedError:
                return None

        # The next batch is fetched while this one is decided and recorded (one fetch
        # at a time on the subscription, so batches still come in order). Stopping
        # waits for the fetch in flight (at most tick_s) and records what it brought.
        pending = asyncio.create_task(fetch())
        try:
            while True:
                msgs = await pending
                if msgs is None:
                    return
                last_round = stop.is_set()
                if not last_round:
                    pending = asyncio.create_task(fetch())
                if msgs:
                    await self.process(msgs)
                else:
                    self._caught_up = self._nc.is_connected  # nothing waiting in ingress
                if last_round:
                    return
                if self._internal:
                    await self.process_internal()
                if self._clock() - self._last_tick >= tick_s:
                    await self.run_timers()
        finally:
            if not pending.done():  # cancelled: what it fetches comes again (unacked)
                pending.cancel()

    def submit(self, candidate: Event) -> None:
        """Queue a candidate event from inside the hub (an infrastructure check result);
        the loop decides and records it between ingress batches, at most ``tick_s`` later."""
        self._internal.append(candidate)

    async def process_internal(self) -> list[Event]:
        """Decide and record the queued internal candidates."""
        now = self._clock()
        candidates, self._internal = self._internal, []
        recorded: list[Event] = []
        for candidate in candidates:
            self.state, events = react(self.state, candidate, now)
            recorded.extend(events)
        if recorded:
            positions = await self._record(recorded, [])
            await self._announce(recorded)
            await self._progress.appended(self.state.ingress.floor, positions)
        return recorded

    async def run_timers(self) -> list[Event]:
        """Take and record the lease timer's decisions due now."""
        now = self._clock()
        self._last_tick = now
        judge = self._caught_up and self._nc.is_connected
        if not judge:
            self._metrics.inc("lease_decisions_deferred_lagging")
        decided = tick(self.state, now, lease_floor=self.started_at, judge_leases=judge)
        if not decided:
            return decided
        for e in decided:
            evolve(self.state, e)
            self._metrics.inc(f"timer_{type(e).__name__}")
        positions = await self._record(decided, [])
        await self._announce(decided)
        await self._progress.appended(self.state.ingress.floor, positions)
        return decided

    async def process(self, msgs: list[Msg]) -> None:
        """Record the events of one fetched batch, then acknowledge it."""
        now = self._clock()
        recorded: list[Event] = []
        dead: list[Rejection] = []
        max_seq = 0
        counts: Counter[str] = Counter()
        seq = pending = 0
        ts = now
        for i, msg in enumerate(msgs, 1):
            if i % YIELD_EVERY == 0:  # a large batch must not hold up the queries
                await asyncio.sleep(0)
            seq, ts, pending = ack_metadata(msg.reply)
            max_seq = max(max_seq, seq)
            if self.state.ingress.seen(seq):
                counts["ingress_redelivered_skipped"] += 1
                continue
            candidate = classify(self._config, msg.subject, msg.data or b"", seq=seq, ts=ts)
            self.state, events = react(self.state, candidate, now)
            for e in events:
                if type(e) is InputRejected:
                    dead.append(Rejection(e, msg.data or b""))
                    counts["ingress_rejected"] += 1
                    counts[f"ingress_rejected:{e.reason_code}"] += 1
                else:
                    counts[_COUNTERS.get(type(e)) or f"ingress_{type(e).__name__}"] += 1
            recorded.extend(events)
        for name, n in counts.items():
            self._metrics.inc(name, n)
        positions = await self._record(recorded, dead)
        await self._announce(recorded)
        for i, msg in enumerate(msgs, 1):
            await msg.ack()
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        # Caught up: nothing left in ingress, or what is left is recent (lease
        # decisions need the hub to have seen the latest heartbeats).
        self._caught_up = pending == 0 or now - ts < self.state.policy.max_lag_s
        self._batches += 1
        if self.state.ingress.above and (
            self._batches % 50 == 0 or len(self.state.ingress.above) > 10_000
        ):
            await self._compact_ledger()
        if max_seq:
            await self._progress.appended(self.state.ingress.floor, positions)

    async def _compact_ledger(self) -> None:
        """Raise the ledger's floor to the stream's first message: below it, everything
        was acknowledged (so recorded) or removed, and cannot come again."""
        try:
            info = await self._js.stream_info(INGRESS_STREAM)
        except Exception as exc:  # not worth failing a batch for
            log.info("ingress_stream_info_failed", error=repr(exc))
            return
        self.state.ingress.raise_floor(info.state.first_seq)

    async def _record(self, recorded: list[Event], dead: list[Rejection]) -> dict[int, int]:
        """Dead-letter, then append; retried until done (never re-decided)."""
        delay = 0.1
        while True:
            try:
                for d in dead:
                    await self._dead_letter(d)
                records = await self._log.append(recorded)
                break
            except Exception as exc:  # the log or NATS is down: wait, keep the decisions
                log.warning("append_failed_retrying", error=repr(exc), events=len(recorded))
                self._metrics.inc("append_retries")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._metrics.inc("events_appended", len(recorded))
        positions = advance({}, records)
        if self._tail is not None:
            self._tail.publish(records, positions, complete=self._log.exclusive)
        return positions

    async def _dead_letter(self, d: Rejection) -> None:
        e = d.event
        await self._js.publish(
            DLQ_SUBJECT,
            d.payload,
            headers={
                "Nats-Msg-Id": f"dlq-{e.ingress_seq}",
                "Hub-Reason-Code": e.reason_code,
                "Hub-Reason": e.reason[:1024],
                "Hub-Ingress-Seq": str(e.ingress_seq),
                "Hub-Subject": e.subject,
                "Hub-Tenant": e.tenant,
                "Hub-Event-Id": e.event_id,
            },
        )
        self._metrics.inc("dlq_published")

    async def _announce(self, recorded: list[Event]) -> None:
        """Push recorded events to watchers (core NATS, at most once)."""
        for e in recorded:
            if type(e) in ANNOUNCED:
                await self._nc.publish(watch_subject(e.tenant, WATCH_KIND[type(e)]),
                                       encode_event(e))  # fmt: skip
