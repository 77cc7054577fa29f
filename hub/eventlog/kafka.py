"""The Kafka event log: one topic keyed by tenant/service/instance, transactional appends.

Appends go through a transactional (hence idempotent) producer: a batch of
events is one transaction, so after a crash readers (``read_committed``) see a
whole batch or none of it. A restarted hub with the same ``transactional_id``
fences off its zombie predecessor.

Bounded under heartbeat volume: the topic is compacted (``cleanup.policy=compact``).
Records are placed in partitions by their instance (tenant/service/instance, so
one instance's events stay in order) but keyed for compaction: a heartbeat by
its instance, so the cleaner keeps only the latest heartbeat of each instance;
every other event by a unique key, so it is kept for ever. The compacted log
folds to the same state as the whole history (see
``events.model.HeartbeatReceived``). Compaction is lazy: the active segment and
the last ``segment_ms`` of heartbeats stay until the cleaner runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import cast

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import ProducerFenced, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from events.codec import encode_event
from events.log import LogRecord, Positions
from events.model import AnyEvent, Event, compaction_key, partition_key
from hub.eventlog.port import EventLogNotFound, decode_records
from hub.writer import Fenced

log = structlog.get_logger(__name__)


def log_reader(brokers: str) -> AIOKafkaConsumer:
    """An unstarted consumer that reads the log as the hub does: committed records only,
    no group, large fetches (also the baseline of bench/replay)."""
    return AIOKafkaConsumer(
        bootstrap_servers=brokers,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
    )


class KafkaEventLog:
    """Events on a Kafka topic; partition = hash(tenant/service/instance)."""

    name = "kafka"
    # The hub's transactional producer fences any other producer with its id; the
    # topic has no other writer, so each append follows the previous one directly.
    exclusive = True

    def __init__(
        self,
        brokers: Sequence[str],
        topic: str,
        *,
        partitions: int = 6,
        transactional_id: str | None = None,
        read_only: bool = False,
        segment_ms: int = 10 * 60 * 1000,
    ) -> None:
        self._brokers = ",".join(brokers)
        self.topic = topic
        self._partitions = partitions
        self._transactional_id = transactional_id or f"central-hub.{topic}"
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        # A reader (replay, verify) must not start a producer: one with the hub's
        # transactional id would fence the running hub's producer.
        self._read_only = read_only
        self._topic_config = {
            "cleanup.policy": "compact",
            "segment.ms": str(segment_ms),
            "min.cleanable.dirty.ratio": "0.5",
        }
        self._partition_count = 0

    async def start(self) -> None:
        await self._ensure_topic()
        if self._read_only:
            return
        self._producer = self._new_producer()
        await self._producer.start()

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self._brokers,
            transactional_id=self._transactional_id,
            enable_idempotence=True,
            acks="all",
            linger_ms=2,
            max_batch_size=1024 * 1024,
            compression_type=None,
        )

    async def _ensure_topic(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self._brokers)
        await admin.start()
        try:
            if self.topic in await admin.list_topics():
                if not self._read_only:  # a topic made elsewhere gets the log's settings
                    resource = ConfigResource(
                        ConfigResourceType.TOPIC, self.topic, configs=self._topic_config
                    )
                    await admin.alter_configs([resource])
            elif self._read_only:  # a reader never creates the log (a wrong name, say)
                raise EventLogNotFound(f"Kafka topic {self.topic!r} does not exist")
            else:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics([
                        NewTopic(self.topic, num_partitions=self._partitions,
                                 replication_factor=1, topic_configs=self._topic_config)
                    ])  # fmt: skip
        finally:
            await admin.close()
        # Topic metadata propagates asynchronously; wait until partitions are visible.
        for _ in range(100):
            ids = await self._partition_ids()
            if ids:
                self._partition_count = len(ids)
                return
            await asyncio.sleep(0.1)

    async def _partition_ids(self) -> list[int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=self._brokers)
        await consumer.start()
        try:
            await consumer._client.force_metadata_update()
            return sorted(consumer.partitions_for_topic(self.topic) or [])
        finally:
            await consumer.stop()

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def append(self, events: Sequence[Event]) -> list[LogRecord]:
        """One transaction per batch.

        Raises:
            Fenced: another producer with this log's transactional id (another hub) has
                started since; this one can never write again.
        """
        if not events:
            return []
        if self._producer is None:
            raise RuntimeError("KafkaEventLog: append on a read-only log, or before start()")
        async with self._lock:
            if self._producer._txn_manager.is_fatal_error():
                await self._replace_producer()
            try:
                async with self._producer.transaction():
                    futures = [
                        await self._producer.send(
                            self.topic,
                            value=encode_event(e),
                            key=self._record_key(e),
                            partition=self.partition_of(e),
                            headers=[("event_id", e.event_id.encode())],
                        )
                        for e in events
                    ]
                out = []
                for fut, e in zip(futures, events, strict=True):
                    md = await fut
                    out.append(LogRecord(md.partition, md.offset, cast(AnyEvent, e)))
                return out
            except Exception as exc:
                if _fenced(exc, self._producer):
                    raise Fenced(
                        f"the Kafka producer {self._transactional_id!r} was fenced: another "
                        "hub started a producer with the same transactional id"
                    ) from exc
                raise

    async def _replace_producer(self) -> None:
        """A producer in a fatal state (not fenced: e.g. its sender failed while the broker
        was away) never writes again; start another with the same transactional id, which
        aborts whatever the old one left open."""
        assert self._producer is not None
        old = self._producer
        sender = old._sender.sender_task
        error = (
            sender.exception()
            if sender is not None and sender.done() and not sender.cancelled()
            else None
        )
        if isinstance(error, ProducerFenced):
            raise Fenced(f"the Kafka producer {self._transactional_id!r} was fenced") from error
        log.warning("kafka_producer_replaced", error=repr(error))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.stop(), 10)
        self._producer = self._new_producer()
        await self._producer.start()

    def partition_of(self, event: Event) -> int:
        """The partition of ``event``: by its instance, as Kafka's default partitioner
        would place a record keyed by ``partition_key`` (murmur2)."""
        h: int = murmur2(partition_key(event).encode()) & 0x7FFFFFFF
        return h % self._partition_count

    @staticmethod
    def _record_key(event: Event) -> bytes:
        """The compaction key: the instance for a heartbeat, else unique (kept)."""
        key = compaction_key(event)
        return (key or f"{event.event_id}#{uuid.uuid4().hex}").encode()

    def _consumer(self) -> AIOKafkaConsumer:
        return log_reader(self._brokers)

    async def end_positions(self) -> Positions:
        consumer = self._consumer()
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in await self._partition_ids()]
            ends = await consumer.end_offsets(tps)
            return {tp.partition: off for tp, off in ends.items()}
        finally:
            await consumer.stop()

    async def read(
        self, start: Positions | None = None, *, follow: bool = True, batch: int = 1000
    ) -> AsyncIterator[list[LogRecord]]:
        start = start or {}
        consumer = self._consumer()
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in await self._partition_ids()]
            consumer.assign(tps)
            for tp in tps:
                if start.get(tp.partition, 0) > 0:
                    consumer.seek(tp, start[tp.partition])
                else:
                    await consumer.seek_to_beginning(tp)
            end = {tp: off for tp, off in (await consumer.end_offsets(tps)).items()}
            while True:
                if not follow and all(
                    await asyncio.gather(*(self._reached(consumer, tp, end[tp]) for tp in tps))
                ):
                    return
                fetched = await consumer.getmany(*tps, timeout_ms=200, max_records=batch)
                records = decode_records(
                    [(tp.partition, m.offset, m.value) for tp, msgs in fetched.items()
                     for m in msgs]
                )  # fmt: skip
                if records:
                    yield records
        finally:
            await consumer.stop()

    @staticmethod
    async def _reached(consumer: AIOKafkaConsumer, tp: TopicPartition, end: int) -> bool:
        return bool(await consumer.position(tp) >= end)


def _fenced(exc: BaseException, producer: AIOKafkaProducer) -> bool:
    """Whether ``exc`` (or the producer's fatal state) says another producer fenced it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ProducerFenced):
            return True
        seen = seen.__cause__ or seen.__context__
    return bool(producer._txn_manager.is_fatal_error()) and isinstance(
        _sender_error(producer), ProducerFenced
    )


def _sender_error(producer: AIOKafkaProducer) -> BaseException | None:
    """What ended the producer's sender task (None: it runs)."""
    task = producer._sender.sender_task
    if task is None or not task.done() or task.cancelled():
        return None
    error: BaseException | None = task.exception()
    return error
