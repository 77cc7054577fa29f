"""The embedded default event log: one JetStream stream, one partition."""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import AsyncIterator, Sequence
from typing import cast

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from events.codec import encode_event
from events.log import LogRecord, Positions
from events.model import AnyEvent, Event, compaction_key
from hub.eventlog.port import EventLogNotFound, decode_records

log = structlog.get_logger(__name__)

STREAM = "HUB_EVENTS"
SUBJECT_PREFIX = "hub.log"


def _message(event: Event) -> tuple[str, bytes, dict[str, str]]:
    """Subject, payload and headers of an event's message.

    The subject is ``hub.log.<tenant>.<type>``; a heartbeat gets a subject of its own
    instance (``hub.log.<tenant>.HeartbeatReceived.<digest of the instance>``) and
    ``Nats-Rollup: sub``, so that it replaces that instance's previous heartbeat.
    ``Nats-Msg-Id`` lets the stream drop a duplicate append.
    """
    subject = f"{SUBJECT_PREFIX}.{event.tenant}.{type(event).__name__}"
    key = compaction_key(event)
    if key is None:
        return subject, encode_event(event), {"Nats-Msg-Id": event.event_id}
    return (f"{subject}.{_digest(key)}", encode_event(event),
            {"Nats-Msg-Id": event.event_id, "Nats-Rollup": "sub"})  # fmt: skip


@functools.lru_cache(maxsize=65_536)
def _digest(key: str) -> str:
    """The subject token of a compaction key (hashed once per instance, not per event)."""
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


class JetStreamEventLog:
    """Events as messages of stream ``HUB_EVENTS`` on ``hub.log.<tenant>.<type>``.

    Each message carries ``Nats-Msg-Id: <event_id>``, so the stream itself drops
    a duplicate append within its duplicate window.

    Bounded under heartbeat volume: a heartbeat is published with
    ``Nats-Rollup: sub`` on its instance's subject, which makes the stream delete
    that instance's previous heartbeat when it stores the new one. The log keeps
    every other event and the latest heartbeat of each instance, which folds to
    the same state as the whole history (see ``events.model.HeartbeatReceived``).
    """

    name = "jetstream"

    def __init__(self, nc: Client, *, stream: str = STREAM, read_only: bool = False) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.stream = stream
        # A reader (replay, verify, the views process) neither creates nor reconfigures
        # the stream, and cannot append.
        self._read_only = read_only
        # The stream's last sequence after this writer's last append (or at start);
        # None: unknown (the next append acknowledges each message and reads it again).
        self._last_seq: int | None = None
        self.exclusive = False

    async def start(self) -> None:
        if self._read_only:
            try:
                await self._js.stream_info(self.stream)
            except nats.js.errors.NotFoundError as exc:
                raise EventLogNotFound(f"JetStream stream {self.stream!r} does not exist") from exc
            return
        config = StreamConfig(
            name=self.stream,
            subjects=[f"{SUBJECT_PREFIX}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=120.0,
            allow_rollup_hdrs=True,
        )
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await self._js.update_stream(config)
        # Where the next append must land for the fast path (checked by its PubAck, so
        # anything appended from elsewhere since is noticed, see append).
        self._last_seq = (await self._js.stream_info(self.stream)).state.last_seq

    async def close(self) -> None:
        return None

    async def append(self, events: Sequence[Event]) -> list[LogRecord]:
        """Append ``events`` in order; returns them with the sequence each was stored at.

        The hub is the log's single writer, so a batch is sent as plain publishes and
        only its last message waits for a PubAck: the stream stores one connection's
        messages in order, so if that ack's sequence is exactly the previous last
        sequence + ``len(events)`` (and not a duplicate), every message was stored, in
        order, at consecutive sequences. Anything else (a refused or duplicate
        message, another writer, an append after a failed one) falls back to
        acknowledging each message: duplicates (``Nats-Msg-Id``) then report where
        they were stored, and a refusal raises, so the caller retries the batch.
        """
        if self._read_only:
            raise RuntimeError("JetStreamEventLog: append on a read-only log")
        if not events:
            return []
        msgs = [_message(e) for e in events]
        last = self._last_seq
        if last is not None:
            publish = self._nc.publish
            for i, (subject, data, headers) in enumerate(msgs[:-1], 1):
                await publish(subject, data, headers=headers)
                if i % 500 == 0:  # a large batch must not hold up everything else
                    await asyncio.sleep(0)
            subject, data, headers = msgs[-1]
            ack = await self._js.publish(subject, data, headers=headers)
            if not ack.duplicate and ack.seq == last + len(msgs):
                self._last_seq = ack.seq
                self.exclusive = True
                return [LogRecord(0, last + 1 + i, cast(AnyEvent, e)) for i, e in enumerate(events)]
            log.info("jetstream_append_rechecked", expected=last + len(msgs), got=ack.seq,
                     duplicate=bool(ack.duplicate), events=len(msgs))  # fmt: skip
        self._last_seq = None
        self.exclusive = False  # something else may have been appended in between
        futures = [await self._js.publish_async(subject, data, headers=headers)
                   for subject, data, headers in msgs]  # fmt: skip
        acks = await asyncio.gather(*futures)
        self._last_seq = (await self._js.stream_info(self.stream)).state.last_seq
        return [LogRecord(0, a.seq, cast(AnyEvent, e)) for a, e in zip(acks, events, strict=True)]

    async def end_positions(self) -> Positions:
        info = await self._js.stream_info(self.stream)
        return {0: info.state.last_seq + 1}

    async def read(
        self, start: Positions | None = None, *, follow: bool = True, batch: int = 1000
    ) -> AsyncIterator[list[LogRecord]]:
        first = (start or {}).get(0, 1)
        end = (await self.end_positions())[0]
        if not follow and first >= end:
            return
        sub = await self._js.pull_subscribe(
            f"{SUBJECT_PREFIX}.>",
            durable=None,
            stream=self.stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=max(first, 1),
                ack_policy=AckPolicy.NONE,
                inactive_threshold=30.0,
                max_waiting=1,
            ),
        )
        try:
            while True:
                try:
                    msgs = await sub.fetch(batch, timeout=0.5)
                except (TimeoutError, nats.errors.TimeoutError):
                    msgs = []
                records = decode_records([(0, m.metadata.sequence.stream, m.data) for m in msgs])
                if records:
                    yield records
                if msgs:
                    first = msgs[-1].metadata.sequence.stream + 1
                if not follow and (first >= end or (not msgs and await _drained(sub, first))):
                    return
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # best effort: the consumer also expires on its own
                log.debug("jetstream_unsubscribe_failed")


async def _drained(sub: JetStreamContext.PullSubscription, first: int) -> bool:
    """Whether an empty fetch really found the stream's end for a reader at ``first``.

    A fetch also comes back empty when the server was slow to answer (busy, starved of
    CPU) or the answer came after the fetch gave up: the end is reached only if the
    consumer has nothing left to deliver and nothing it delivered is still on its way.
    (Messages between ``first`` and the end seen at the start may have been rolled up
    since: then the consumer has nothing pending although ``first`` is below the end.)
    """
    info = await sub.consumer_info()
    delivered = info.delivered.stream_seq if info.delivered is not None else 0
    return info.num_pending == 0 and delivered < first
