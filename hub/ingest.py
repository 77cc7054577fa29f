"""The ingest adapter: fetch from the ingress stream, let the core decide, record, ack.

It holds no decision. Every ingress message, every result from inside the hub (an
infrastructure check) and every turn of the lease timer is a candidate for the
application core (``handlers.core.step``), and what the core returns goes through one
path here, ``Ingest._decide_and_record``: dead letters and the events are recorded in
the log, then announced, then the input is acknowledged. So decisions are taken one at
a time on one state and recorded in the order they were taken.

Every ingress message becomes exactly one recorded event (a registration, heartbeat,
deregistration, or an ``InputRejected``), whose id is derived from the ingress sequence,
plus what the core derives from it (a health change). After a crash the hub rebuilds its
state from the log; the ledger of recorded ingress sequences tells which re-delivered
messages are already recorded.

The timer is woken for the next deadline (``handlers.liveness.next_due``), not on a
fixed tick.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

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
from events.log import LogRecord, advance
from events.model import WATCH_KIND, Event
from events.subjects import (
    DLQ_STREAM,
    DLQ_SUBJECT,
    INGRESS_CONSUMER,
    INGRESS_STREAM,
    INGRESS_SUBJECTS,
    watch_subject,
)
from handlers import RegistryState
from handlers.core import (
    Arrival,
    Candidate,
    DeadLetter,
    Internal,
    Outcome,
    TimerTurn,
    next_due,
    step,
)
from hub.config import HubConfig
from hub.eventlog.port import EventLog
from hub.metrics import Metrics
from hub.progress import Progress
from hub.status import HubStatus
from hub.tail import LogTail
from hub.writer import Fenced, WriterLease

log = structlog.get_logger(__name__)

YIELD_EVERY = 500  # messages decided between two turns of the event loop
MIN_WAKE_S = 0.001  # the least wait for the next deadline after a turn that decided nothing


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


def ack_metadata(reply: str) -> tuple[int, float, int, int]:
    """(stream sequence, timestamp, pending, deliveries) of a JetStream message, from its
    reply subject: what nats-py's ``Msg.metadata`` gives (the same timestamp, to the
    microsecond), without building its objects for every message.

    Raises:
        ValueError: not a JetStream message's reply subject.
    """
    t = reply.split(".")
    if t[:2] != ["$JS", "ACK"] or len(t) not in (9, 11, 12):
        raise ValueError(f"not a JetStream reply subject: {reply!r}")
    delivered, seq, ns, pending = (t[4], t[5], t[7], t[8]) if len(t) == 9 else (
        t[6], t[7], t[9], t[10])  # fmt: skip
    # datetime.fromtimestamp(s).timestamp() without the objects: whole seconds plus
    # microseconds rounded half to even, carried into the seconds at 1e6.
    frac, whole = math.modf(int(ns) / 1e9)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        micros -= 1_000_000
        whole += 1.0
    return int(seq), (int(whole) * 1_000_000 + micros) / 1_000_000, int(pending), int(delivered)


BARRIER_UNKNOWN = sys.maxsize  # leases wait for an empty fetch: the backlog is not known


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
        status: HubStatus | None = None,
        lease: WriterLease | None = None,
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
        self._status = status or HubStatus(event_log.name, clock=clock)
        self._lease = lease
        self._batches = 0
        # Leases run from the hub's start (or its NATS connection's return) at the earliest
        # (see liveness.lease_deadline).
        self.lease_floor = clock()
        self._last_tick = 0.0
        self._caught_up = False
        # Leases are judged only once the state has recorded this ingress sequence: the
        # backlog present when an append stalled (see _judge_after_backlog).
        self.barrier: int | None = None
        self._internal: list[Candidate] = []  # from inside the hub (monitor results, ...)
        self._observers: list[Callable[[list[Event]], None]] = []
        self._wake = asyncio.Event()  # set when one is submitted
        self._idle_turn = False  # the last timer turn decided nothing
        self._consumer_created: datetime | None = None
        self._prefetch: asyncio.Task[list[Msg] | None] | None = None
        # A batch that failed (a bug): its messages, tried again one at a time after the
        # state is folded again, so that a failure is put down to the one message it
        # comes from; and how often each such message failed on its own.
        self._retry: list[Msg] = []
        self._failures: dict[int, int] = {}

    async def setup(self, *, take_over: bool = True) -> None:
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
        if take_over:
            await self._take_over_consumer()
        await self._compact_ledger()

    async def _take_over_consumer(self) -> None:
        """Create the durable consumer, or take it over from a previous hub process.

        Messages a crashed hub had fetched but not acknowledged would otherwise be
        held back until their ack wait expires. This hub holds the writer lease (see
        ``hub.writer``), so the previous holder is gone: it recreates the consumer, and
        with work-queue retention the unacknowledged messages stay in the stream and
        come again at once, in order.
        """
        config = ingress_consumer_config()
        try:
            info = await self._js.consumer_info(INGRESS_STREAM, INGRESS_CONSUMER)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None and info.num_ack_pending:
            log.info("ingress_consumer_taken_over", unacknowledged=info.num_ack_pending)
            await self._js.delete_consumer(INGRESS_STREAM, INGRESS_CONSUMER)
        created = await self._js.add_consumer(INGRESS_STREAM, config)
        self._consumer_created = created.created

    async def verify_consumer(self) -> None:
        """Raise ``Fenced`` if the durable consumer is no longer the one this hub made.

        Replaced, it is another hub's (one that ignored the writer lease): what this hub
        fetched is no longer its own to acknowledge. Deleted (by an operator, or a client
        allowed to), it is made again: this hub holds the lease, so it is the only
        consumer, and what was not acknowledged comes again (recorded messages are then
        only acknowledged, see the ledger).
        """
        if self._consumer_created is None:
            return  # not set up yet
        try:
            info = await self._js.consumer_info(INGRESS_STREAM, INGRESS_CONSUMER)
        except nats.js.errors.NotFoundError:
            log.warning("ingress_consumer_recreated", reason="it was deleted")
            self._metrics.inc("ingress_consumer_recreated")
            await self._take_over_consumer()
            return
        if info.created != self._consumer_created:
            raise Fenced(
                f"the ingress consumer {INGRESS_CONSUMER} was replaced (created "
                f"{info.created.isoformat()}, this hub made it at "
                f"{self._consumer_created.isoformat()}): another hub consumes this ingress"
            )

    async def _ensure_stream(self, config: StreamConfig) -> None:
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await self._js.update_stream(config)

    def reset(self, state: RegistryState) -> None:
        """Continue from ``state`` (folded from the log again after a failure): what was
        decided but not recorded is forgotten, and comes again from ingress."""
        self.state = state
        self._caught_up = False
        self.barrier = BARRIER_UNKNOWN

    def reconnected(self) -> None:
        """The NATS connection came back: services may not have reached NATS meanwhile,
        so every lease runs from now at the earliest, and leases wait for what ingress
        holds now."""
        self.lease_floor = self._clock()
        self._caught_up = False
        self.barrier = BARRIER_UNKNOWN

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self._js.pull_subscribe_bind(INGRESS_CONSUMER, stream=INGRESS_STREAM)
        tick_s = self._config.tick_s
        await self._retry_one_by_one()
        if self._internal:  # submitted before the loop ran (the rules in force): first
            await self.process_internal()

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
        # While a fetch waits, the timer's deadlines and internal candidates are taken
        # when they come.
        self._prefetch = pending = asyncio.create_task(fetch())
        try:
            while True:
                msgs = await self._meanwhile(pending)
                if msgs is None:
                    return
                last_round = stop.is_set()
                if not last_round:
                    self._prefetch = pending = asyncio.create_task(fetch())
                if msgs:
                    try:
                        await self.process(msgs)
                    except Fenced:
                        raise
                    except Exception:
                        # Not recorded (a bug): keep this batch and the one fetched
                        # meanwhile, to try one message at a time after the restart.
                        self._retry = msgs + await self._take(None if last_round else pending)
                        raise
                else:
                    # Nothing waiting in ingress: every backlog there was is recorded.
                    self._caught_up = self._nc.is_connected
                    if self._caught_up and self.barrier is not None:
                        self._leases_resume()
                if last_round:
                    return
                await self._internal_and_timers()
        finally:
            if not pending.done():  # cancelled: what it fetches comes again (unacked)
                pending.cancel()

    async def _meanwhile(self, pending: asyncio.Task[list[Msg] | None]) -> list[Msg] | None:
        """What ``pending`` fetches; until it comes, take internal candidates as they are
        submitted and the timer's decisions when they are due."""
        while True:
            wake = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({pending, wake}, timeout=self._until_due(),
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            finally:
                wake.cancel()
            if pending.done():
                return pending.result()
            await self._internal_and_timers()

    def _judging(self) -> bool:
        """Whether lease decisions are taken now (the hub has seen the latest heartbeats)."""
        return self._caught_up and self._nc.is_connected and self._backlog_recorded()

    def _until_due(self) -> float:
        """Seconds until the timer is next due (at most ``tick_s``: lagging and the
        connection are looked at again at least that often)."""
        due = next_due(self.state, lease_floor=self.lease_floor, judge_leases=self._judging())
        wait = min(self._config.tick_s, due - self._clock())
        return max(wait, MIN_WAKE_S if self._idle_turn else 0.0)

    async def _internal_and_timers(self) -> None:
        """Take the queued internal candidates, and the timer's turn if it is due."""
        if self._internal:
            await self.process_internal()
        if self._until_due() <= 0 or self._clock() - self._last_tick >= self._config.tick_s:
            self._idle_turn = not await self.run_timers()
        else:
            self._idle_turn = False

    async def _take(self, prefetch: asyncio.Task[list[Msg] | None] | None) -> list[Msg]:
        """What the fetch in flight brings (bounded wait; its messages are not lost
        otherwise, only delivered again after the ack wait)."""
        if prefetch is None:
            return []
        try:
            return await asyncio.wait_for(prefetch, self._config.tick_s + 5) or []
        except (Exception, TimeoutError):
            return []

    async def _retry_one_by_one(self) -> None:
        """Record the messages of a failed batch one at a time (see ``process``: one the
        hub has failed on ``max_deliver`` times on its own is dead-lettered)."""
        if not self._retry:
            return
        await self._keep_alive(self._retry)
        log.warning("ingress_retrying_one_by_one", messages=len(self._retry))
        while self._retry:
            msg = self._retry[0]
            try:
                await self.process([msg])
            except Fenced:
                raise
            except Exception:
                seq = ack_metadata(msg.reply)[0]
                self._failures[seq] = self._failures.get(seq, 0) + 1
                raise
            self._retry.pop(0)
            self._failures.pop(ack_metadata(msg.reply)[0], None)

    def submit(self, candidate: Event | Candidate) -> None:
        """Queue a candidate from inside the hub (an infrastructure check result, a
        notification's outcome, a silence); the loop decides and records it as soon as
        the batch in hand is recorded."""
        self._internal.append(Internal(candidate) if isinstance(candidate, Event) else candidate)
        self._wake.set()

    def observe(self, observer: Callable[[list[Event]], None]) -> None:
        """Call ``observer(events)`` with what was recorded, each time, once it is in the
        log (the notification dispatcher sends what became due)."""
        self._observers.append(observer)

    async def process_internal(self) -> list[Event]:
        """Decide and record the queued internal candidates."""
        candidates, self._internal = self._internal, []
        self._wake.clear()
        outcome = await self._decide_and_record(candidates)
        return outcome.record

    async def run_timers(self) -> list[Event]:
        """Take and record the lease timer's decisions due now."""
        self._last_tick = self._clock()
        turn = TimerTurn(lease_floor=self.lease_floor, judge_leases=self._judging())
        outcome = await self._decide_and_record([turn])
        return outcome.record

    async def _decide_and_record(
        self, candidates: list[Candidate], inflight: list[Msg] | None = None
    ) -> Outcome:
        """The one path of every decision: the core decides (``handlers.core.step``),
        then dead letters and events are recorded (``_record``), announced, and the
        progress published. Ingress batches (``inflight``: the messages, acknowledged
        by the caller after this) are recorded even when nothing is new, so that the
        progress moves past re-delivered input."""
        now = self._clock()
        outcome = Outcome()
        for i in range(0, len(candidates), YIELD_EVERY):
            if i:  # a large batch must not hold up the rest of the loop
                await asyncio.sleep(0)
            outcome.extend(step(self.state, now, candidates[i : i + YIELD_EVERY], self._config))
        for n in outcome.notices:
            getattr(log, n.level)(n.name, **n.fields, exc_info=n.error)
        for name, count in outcome.counts.items():
            self._metrics.inc(name, count)
        if not (outcome.record or outcome.dead or inflight):
            return outcome
        positions = await self._record(outcome.record, outcome.dead, inflight)
        for observer in self._observers:
            observer(outcome.record)
        await self._announce(outcome.announce)
        await self._progress.appended(self.state.ingress.floor, positions)
        return outcome

    def _backlog_recorded(self) -> bool:
        """Whether the state has recorded the backlog present when the barrier was set."""
        if self.barrier is None:
            return True
        if self.state.ingress.high < self.barrier:
            return False
        self._leases_resume()
        return True

    def _leases_resume(self) -> None:
        log.info("lease_decisions_resumed", barrier=self.barrier, recorded=self.state.ingress.high)
        self.barrier = None

    async def _judge_after_backlog(self) -> None:
        """After a stalled append the backlog count the batch came with is stale: what
        waited in ingress meanwhile (heartbeats among it) must be recorded before any
        lease is judged, or the whole fleet looks silent."""
        self._caught_up = False
        try:
            info = await self._js.stream_info(INGRESS_STREAM)
            last = int(info.state.last_seq)
        except Exception as exc:
            log.info("ingress_stream_info_failed", error=repr(exc))
            last = BARRIER_UNKNOWN
        if self.barrier is None:
            log.info("lease_decisions_wait_for_backlog", barrier=last,
                     recorded=self.state.ingress.high)  # fmt: skip
        self.barrier = max(self.barrier or 0, last)

    async def process(self, msgs: list[Msg]) -> None:
        """Record the events of one fetched batch, then acknowledge it."""
        arrivals: list[Candidate] = []
        pending, ts = 0, self._clock()
        for msg in msgs:
            seq, ts, pending, delivered = ack_metadata(msg.reply)
            # Failed on it alone before, in this process or (delivered again) another.
            failed = self._failures.get(seq, 0) + delivered - 1
            arrivals.append(Arrival(seq, ts, msg.subject, msg.data or b"", failed))
        await self._decide_and_record(arrivals, msgs)
        for i, msg in enumerate(msgs, 1):
            await msg.ack()
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        # Caught up: nothing left in ingress, or what is left is recent (lease
        # decisions need the hub to have seen the latest heartbeats).
        if self.barrier is None:
            self._caught_up = pending == 0 or self._clock() - ts < self.state.policy.max_lag_s
        self._batches += 1
        if self.state.ingress.above and (
            self._batches % 50 == 0 or len(self.state.ingress.above) > 10_000
        ):
            await self._compact_ledger()

    async def _compact_ledger(self) -> None:
        """Raise the ledger's floor to the stream's first message: below it, everything
        was acknowledged (so recorded) or removed, and cannot come again."""
        try:
            info = await self._js.stream_info(INGRESS_STREAM)
        except Exception as exc:  # not worth failing a batch for
            log.info("ingress_stream_info_failed", error=repr(exc))
            return
        self.state.ingress.raise_floor(info.state.first_seq)

    async def _record(
        self, recorded: list[Event], dead: list[DeadLetter], inflight: list[Msg] | None = None
    ) -> dict[int, int]:
        """Dead-letter, then append; retried until done (never re-decided).

        An append that fails, or has not completed after ``log_stall_s``, is reported
        at once (``HubStatus.log_stalled``), and the messages it waits for are kept from
        being delivered again meanwhile. One that took longer than the lag leases allow
        (``max_lag_s``) makes leases wait for the backlog that built up meanwhile.
        """
        attempt = asyncio.ensure_future(self._append(recorded, dead))
        began = time.monotonic()
        stall_s = self._config.log_stall_s
        keep_alive_every = (ingress_consumer_config().ack_wait or 30.0) / 3
        kept_alive = time.monotonic()
        troubled = False
        try:
            while True:
                done, _ = await asyncio.wait({attempt}, timeout=stall_s)
                if done:
                    break
                troubled = True
                await self._status.log_stalled(
                    self._status.log_error or f"the append has not completed for {stall_s:g} s",
                    waiting=len(recorded),
                )
                if time.monotonic() - kept_alive >= keep_alive_every:
                    kept_alive = time.monotonic()
                    await self._keep_alive(inflight or [])
        finally:
            if not attempt.done():
                attempt.cancel()
        records, failures = attempt.result()
        await self._status.log_recovered()  # (if it had been said to stall)
        if troubled or failures or time.monotonic() - began > self.state.policy.max_lag_s:
            await self._judge_after_backlog()
        self._metrics.inc("events_appended", len(recorded))
        positions = advance({}, records)
        if self._tail is not None:
            self._tail.publish(records, positions, complete=self._log.exclusive)
        return positions

    async def _append(
        self, recorded: list[Event], dead: list[DeadLetter]
    ) -> tuple[list[LogRecord], int]:
        """Dead letters then the append, retried with backoff; (records, failed tries or
        waits for the writer lease).

        Raises:
            Fenced: this hub is no longer the writer (not retried).
        """
        delay = 0.1
        failures = 0
        while True:
            if self._lease is not None and not self._lease.valid():
                # Not (or no longer) the writer: another hub may be. Wait until the
                # lease is renewed; the hub stops if it was taken over.
                failures += 1
                await self._status.log_stalled(
                    "the writer lease is not renewed (NATS unreachable?)", waiting=len(recorded)
                )
                await asyncio.sleep(0.1)
                continue
            try:
                for d in dead:
                    await self._dead_letter(d)
                return await self._log.append(recorded), failures
            except Fenced:
                raise
            except Exception as exc:  # the log or NATS is down: wait, keep the decisions
                failures += 1
                log.warning("append_failed_retrying", error=repr(exc), events=len(recorded))
                self._metrics.inc("append_retries")
                await self._status.log_stalled(repr(exc), waiting=len(recorded))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _keep_alive(self, msgs: list[Msg]) -> None:
        """Tell JetStream the batch (and the one fetched meanwhile) is still being worked
        on, so a long stall does not make it deliver them again."""
        batches = [msgs]
        prefetch = self._prefetch
        if prefetch is not None and prefetch.done() and not prefetch.cancelled():
            batches.append(prefetch.result() or [])
        try:
            for batch in batches:
                for msg in batch:
                    await msg.in_progress()
        except Exception as exc:
            log.info("ingress_keep_alive_failed", error=repr(exc))

    async def _dead_letter(self, d: DeadLetter) -> None:
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

    async def _announce(self, announced: list[Event]) -> None:
        """Push recorded events to watchers (core NATS, at most once)."""
        for e in announced:
            await self._nc.publish(watch_subject(e.tenant, WATCH_KIND[type(e)]), encode_event(e))

    async def backlog(self) -> dict[str, Any]:
        """What waits in ingress: messages not yet delivered, delivered but not
        acknowledged, and the age of the oldest message (``hub.query.status``)."""
        info = await self._js.consumer_info(INGRESS_STREAM, INGRESS_CONSUMER)
        stream = await self._js.stream_info(INGRESS_STREAM)
        oldest_age = 0.0
        if stream.state.messages:
            first = await self._js.get_msg(INGRESS_STREAM, seq=stream.state.first_seq, next=True)
            if first.time is not None:
                oldest_age = max(0.0, self._clock() - first.time.timestamp())
        return {
            "pending": info.num_pending or 0,
            "ack_pending": info.num_ack_pending or 0,
            "messages": stream.state.messages,
            "oldest_age_s": round(oldest_age, 3),
            "recorded_through": self.state.ingress.high,
            "lease_decisions": "waiting for the backlog" if self.barrier is not None else "on",
        }
