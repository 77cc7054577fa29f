"""The embedded default event log: one JetStream stream, one partition."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from events.codec import decode_event, encode_event
from events.log import LogRecord, Positions
from events.model import Event, compaction_key

log = structlog.get_logger(__name__)

STREAM = "HUB_EVENTS"
SUBJECT_PREFIX = "hub.log"


def subject_of(event: Event) -> str:
    """``hub.log.<tenant>.<type>``; a heartbeat gets a subject of its own instance
    (``hub.log.<tenant>.HeartbeatReceived.<digest of the instance>``) so that it can
    roll up, i.e. replace, that instance's previous heartbeat."""
    subject = f"{SUBJECT_PREFIX}.{event.tenant}.{type(event).__name__}"
    key = compaction_key(event)
    if key is not None:
        subject += "." + hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
    return subject


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

    def __init__(self, nc: Client, *, stream: str = STREAM) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.stream = stream

    async def start(self) -> None:
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

    async def close(self) -> None:
        return None

    async def append(self, events: Sequence[Event]) -> Positions:
        futures = []
        for event in events:
            headers = {"Nats-Msg-Id": event.event_id}
            if compaction_key(event) is not None:
                headers["Nats-Rollup"] = "sub"
            data = encode_event(event)
            futures.append(await self._js.publish_async(subject_of(event), data, headers=headers))
        if not futures:
            return {}
        acks = await asyncio.gather(*futures)
        return {0: max(a.seq for a in acks) + 1}

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
                records = [
                    LogRecord(0, m.metadata.sequence.stream, decode_event(m.data)) for m in msgs
                ]
                if records:
                    yield records
                    first = records[-1].position + 1
                if not follow and (first >= end or not records):
                    return
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # best effort: the consumer also expires on its own
                log.debug("jetstream_unsubscribe_failed")
