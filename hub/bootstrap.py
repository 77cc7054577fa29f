"""The one place that builds the hub's connections, event log and views from ``HubConfig``.

The hub process, its views process and query servers, ``hub replay`` / ``hub verify``
and the benchmarks all get their objects here, so a setting (a pool's size, a view's
cache, how long check results are kept) reads the same everywhere:

* NATS through ``hub.natsconn`` (``HubClient``: a read loop that survives subjects
  that are not UTF-8): ``connect_nats``, ``log_nats``;
* PostgreSQL: ``connect_postgres`` (an asyncpg pool, waiting for the server) and
  ``query_postgres`` (the query servers' pool: connects on first use);
* Redis: ``redis_client`` (the views' writer, the readers of ``hub replay``) and
  ``query_redis`` (the query servers' bounded pool);
* the event log (JetStream or Kafka, read-only for readers): ``make_event_log``;
* the views: ``postgres_projection``, ``redis_projection``, ``view_projections``.

Only construction lives here: what to do with the objects, and when to close them,
stays with their owner. ``tests/unit/test_architecture.py`` holds the rule that no
other module of ``hub/`` or ``bench/`` calls a connection constructor (and names the
adapters that may).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from nats.aio.client import Client
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hub import natsconn
from hub.config import HubConfig
from hub.eventlog.jetstream import JetStreamEventLog
from hub.eventlog.kafka import KafkaEventLog
from hub.eventlog.port import EventLog
from hub.natsconn import HubClient
from hub.queries import MAX_FAST, MAX_WORKING, PoolExhausted
from projections.port import Projection
from projections.postgres import PostgresRegistryProjection
from projections.redis import RedisRegistryProjection

log = structlog.get_logger(__name__)

POOL_WAIT_S = 0.05  # a query waits this long at most for a free connection, then BUSY


# --- NATS -----------------------------------------------------------------------------------


async def connect_nats(config: HubConfig, name: str, **options: Any) -> HubClient:
    """A connected ``HubClient`` to the configured servers.

    Args:
        config: the servers (``nats_urls``).
        name: the connection's name, as the server's monitoring shows it.
        **options: further options of ``nats.connect`` (reconnects, callbacks).
    """
    return await natsconn.connect(list(config.nats_urls), name=name, **options)


async def log_nats(config: HubConfig, name: str, **options: Any) -> HubClient | None:
    """The NATS connection a reader of the event log needs: one for the JetStream log,
    None for the Kafka log (which has its own clients)."""
    if config.event_log == "kafka":
        return None
    return await connect_nats(config, name, **options)


# --- PostgreSQL -----------------------------------------------------------------------------


async def connect_postgres(config: HubConfig, *, timeout: float = 30.0) -> asyncpg.Pool:
    """A pool to the configured database, waiting for the server to accept connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pool: asyncpg.Pool = await asyncpg.create_pool(
                config.postgres_dsn, min_size=1, max_size=8
            )
            return pool
        except (OSError, asyncpg.CannotConnectNowError) as exc:
            if time.monotonic() > deadline:
                raise
            log.info("postgres_not_ready", error=repr(exc))
            await asyncio.sleep(0.5)


async def query_postgres(config: HubConfig) -> asyncpg.Pool:
    """The query servers' pool (``hub.query.alerts``): no connection until a query needs
    one (a query server starts without the database), a connection per query let in
    (``MAX_WORKING`` + ``MAX_FAST``) and 2 more, connecting and every statement under the
    query timeout."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        config.postgres_dsn, min_size=0, max_size=MAX_WORKING + MAX_FAST + 2,
        timeout=config.query_timeout_s, command_timeout=config.query_timeout_s,
    )  # fmt: skip
    return pool


# --- Redis ----------------------------------------------------------------------------------


def redis_client(config: HubConfig) -> aioredis.Redis:
    """A client of the configured Redis-protocol server (strings decoded), as the views'
    writers and ``hub replay`` use it. Connects on first use."""
    return aioredis.Redis(
        host=config.redis_host, port=config.redis_port, password=config.redis_password or None,
        db=config.redis_db, decode_responses=True,
    )  # fmt: skip


class _QueryPool(BlockingConnectionPool):
    """A bounded pool whose exhaustion is told apart (``PoolExhausted``: BUSY) from a
    store that cannot be reached."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except redis.exceptions.ConnectionError as exc:
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise PoolExhausted(str(exc)) from exc
            raise


def query_redis(config: HubConfig) -> aioredis.Redis:
    """The query servers' Redis client: every call under the query timeout (connecting
    too), never retried, from a pool of a connection per query let in (``MAX_WORKING``
    + ``MAX_FAST``) and 2 more, that a query waits for ``POOL_WAIT_S`` at most."""
    pool = _QueryPool(
        host=config.redis_host, port=config.redis_port, password=config.redis_password or None,
        db=config.redis_db, decode_responses=True, max_connections=MAX_WORKING + MAX_FAST + 2,
        timeout=POOL_WAIT_S, socket_timeout=config.query_timeout_s,
        socket_connect_timeout=config.query_timeout_s, retry=Retry(NoBackoff(), 0),
    )  # fmt: skip
    return aioredis.Redis.from_pool(pool)


# --- the event log --------------------------------------------------------------------------


def make_event_log(config: HubConfig, nc: Client | None, *, read_only: bool = False) -> EventLog:
    """The configured event log (not started); ``read_only`` for readers (replay, verify,
    the views process): it cannot append, and ``start`` neither creates the log nor
    changes its settings (``EventLogNotFound`` when it does not exist).

    Raises:
        ValueError: the JetStream log without a NATS connection (``nc``).
    """
    if config.event_log == "kafka":
        return KafkaEventLog(config.kafka_brokers, config.kafka_topic,
                             partitions=config.kafka_partitions, read_only=read_only,
                             segment_ms=config.kafka_segment_ms)  # fmt: skip
    if nc is None:
        raise ValueError("the JetStream event log needs a NATS connection")
    return JetStreamEventLog(nc, read_only=read_only)


# --- the views ------------------------------------------------------------------------------


def postgres_projection(config: HubConfig, pool: asyncpg.Pool) -> PostgresRegistryProjection:
    """The PostgreSQL registry view, with the hub's cache and check-journal settings."""
    return PostgresRegistryProjection(
        pool, journal_days=config.infra_history_days, cache=config.view_cache
    )


def redis_projection(config: HubConfig, client: aioredis.Redis) -> RedisRegistryProjection:
    """The Redis live registry view, with the hub's cache setting."""
    return RedisRegistryProjection(client, cache=config.view_cache)


def view_projections(
    config: HubConfig, pool: asyncpg.Pool, client: aioredis.Redis
) -> list[Projection]:
    """The views the hub keeps: the PostgreSQL registry and the Redis live registry."""
    return [postgres_projection(config, pool), redis_projection(config, client)]
