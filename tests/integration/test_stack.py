"""The dev/test stack launcher: every server starts, answers a real client, and stops."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg
import nats
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from hub.stack import (
    EmbeddedStack,
    KafkaServer,
    KafkaUnavailable,
    NatsServer,
    PostgresServer,
    RedisServer,
    StackError,
)
from hub.stack import kafka as kafka_module
from hub.stack._process import ManagedProcess, port_is_free


def assert_gone(server: ManagedProcess, pid: int) -> None:
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert port_is_free(server.port), f"{server.name} still listens on {server.port}"


async def test_nats_answers_core_and_jetstream(nats_server: NatsServer):
    """NATS starts with JetStream: core publish/subscribe round-trips and a stream stores a
    published message (the ack carries the stream and sequence 1)."""
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("stack.test")
        await nc.publish("stack.test", b"hello")
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"hello"

        js = nc.jetstream()
        await js.add_stream(name="STACKTEST", subjects=["stack.js.>"])
        ack = await js.publish("stack.js.one", b"stored")
        assert (ack.stream, ack.seq) == ("STACKTEST", 1)
        stored = await js.get_msg("STACKTEST", 1)
        assert stored.data == b"stored"
    finally:
        await nc.drain()


async def test_nats_max_payload_is_applied(tmp_path: Path):
    """``max_payload`` reaches the server: the client learns it from the INFO line."""
    with NatsServer(tmp_path / "nats", max_payload=64 * 1024) as server:
        nc = await nats.connect(server.url)
        try:
            assert nc.max_payload == 64 * 1024
        finally:
            await nc.close()


def test_nats_stops_and_frees_its_port(tmp_path: Path):
    """stop() ends the nats-server process, frees its port, and may be called twice."""
    server = NatsServer(tmp_path / "nats").start()
    pid = server.pid
    assert server.running and pid is not None
    server.stop()
    server.stop()
    assert_gone(server, pid)


async def test_postgres_serves_a_created_database(
    postgres_server: PostgresServer, pg_database: str
):
    """The session PostgreSQL accepts a connection to a freshly created database."""
    conn = await asyncpg.connect(postgres_server.dsn(pg_database))
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == pg_database
        assert (await conn.fetchval("SHOW server_version")).startswith("16")
    finally:
        await conn.close()


async def test_postgres_restarts_on_its_data_dir_and_stops(stack_root: Path):
    """A second start on the same data dir reuses the cluster (databases survive);
    stop() ends the postmaster and frees the port."""
    data_dir = stack_root / "postgres-lifecycle"
    with PostgresServer(data_dir) as server:
        server.create_database("kept")
    pid = server.pid
    assert pid is not None
    assert_gone(server, pid)

    with PostgresServer(data_dir) as again:
        conn = await asyncpg.connect(again.dsn())
        try:
            names = {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
        finally:
            await conn.close()
        assert "kept" in names
    assert again.pid is not None
    assert_gone(again, again.pid)


def test_redis_answers_and_stops(redis_server: RedisServer):
    """Valkey answers PING/SET/GET over the Redis protocol; stop() frees its port."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.ping() is True
        assert client.set("stack:key", "value") is True
        assert client.get("stack:key") == b"value"
    finally:
        client.close()
    pid = redis_server.pid
    assert pid is not None
    redis_server.stop()
    assert_gone(redis_server, pid)


def test_early_exit_raises_stack_error_with_the_log(tmp_path: Path):
    """A server that dies while starting (its port is taken) raises StackError carrying
    the tail of its log, and leaves no process behind."""
    with RedisServer(tmp_path / "first") as first:
        second = RedisServer(tmp_path / "second", port=first.port)
        with pytest.raises(StackError, match="valkey on port") as failure:
            second.start(timeout=10)
        assert "Address already in use" in str(failure.value)
        assert not second.running


@pytest.mark.kafka
async def test_kafka_round_trips_a_message(kafka_server: KafkaServer, kafka_topic: str):
    """The broker auto-creates a new topic (6 partitions); a produced message is read back
    by a consumer from the earliest offset."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka_server.bootstrap)
    await producer.start()
    try:
        sent = await producer.send_and_wait(kafka_topic, b"payload", key=b"k")
        partitions = await producer.partitions_for(kafka_topic)
    finally:
        await producer.stop()
    assert len(partitions) == 6

    consumer = AIOKafkaConsumer(
        kafka_topic,
        bootstrap_servers=kafka_server.bootstrap,
        group_id=f"{kafka_topic}-reader",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=20)
    finally:
        await consumer.stop()
    assert (record.value, record.key) == (b"payload", b"k")
    assert (record.partition, record.offset) == (sent.partition, sent.offset)


@pytest.mark.kafka
def test_kafka_stops_and_frees_its_ports(stack_root: Path):
    """A dedicated broker starts and stop() ends the JVM, freeing both listener ports."""
    server = KafkaServer(stack_root / "kafka-lifecycle").start()
    pid = server.pid
    assert pid is not None
    server.stop()
    assert_gone(server, pid)
    assert port_is_free(server.controller_port)


async def test_embedded_stack_starts_describes_and_stops(stack_root: Path):
    """EmbeddedStack (without Kafka) starts NATS, PostgreSQL and Valkey, creates the hub's
    database, exports the hub's environment, lists three servers, and stop() leaves
    nothing running."""
    stack = EmbeddedStack(stack_root / "embedded").start()
    try:
        env = stack.env()
        assert set(env) == {
            "NATS_URL", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "POSTGRES_USER",
            "POSTGRES_PASSWORD", "DRAGONFLY_HOST", "DRAGONFLY_PORT", "DRAGONFLY_PASSWORD",
            "HUB_EVENT_LOG",
        }  # fmt: skip
        assert env["POSTGRES_DB"] == "central_hub"
        assert env["HUB_EVENT_LOG"] == "jetstream"
        assert env["NATS_URL"] == stack.nats.url
        assert stack.kafka is None
        assert len(stack.describe()) == 3

        conn = await asyncpg.connect(
            host=env["POSTGRES_HOST"],
            port=int(env["POSTGRES_PORT"]),
            user=env["POSTGRES_USER"],
            database=env["POSTGRES_DB"],
        )
        try:
            assert await conn.fetchval("SELECT current_database()") == "central_hub"
        finally:
            await conn.close()
        pids = [(server, server.pid) for server in stack.servers]
    finally:
        stack.stop()
    for server, pid in pids:
        assert pid is not None
        assert_gone(server, pid)


def test_kafka_unavailable_when_maven_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """When Maven cannot produce the jars, ensure_jars raises KafkaUnavailable whose reason
    carries Maven's output, and nothing is marked complete (the next run retries)."""
    broken = tmp_path / "pom.xml"
    broken.write_text("<project>this is not a pom")
    monkeypatch.setattr(kafka_module, "POM", broken)
    monkeypatch.setenv("HUB_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(KafkaUnavailable, match="Maven could not fetch") as failure:
        KafkaServer.ensure_jars()
    assert "pom.xml" in failure.value.reason
    assert not (tmp_path / "cache" / "kafka" / "libs" / ".complete").exists()


def test_kafka_unavailable_without_maven(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Without jars in the cache and no ``mvn`` on PATH, ensure_jars says so clearly."""
    monkeypatch.setenv("HUB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KafkaUnavailable, match="Maven"):
        KafkaServer.ensure_jars()
