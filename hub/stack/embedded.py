"""The whole dev/test stack: NATS (JetStream), PostgreSQL, Valkey and optionally Kafka."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from hub.stack._process import ManagedProcess
from hub.stack.kafka import KafkaServer
from hub.stack.nats import NatsServer
from hub.stack.postgres import PostgresServer
from hub.stack.redis import RedisServer

log = structlog.get_logger(__name__)

DATABASE = "central_hub"


class EmbeddedStack:
    """Starts every server the hub needs on 127.0.0.1 under ``data_dir``; see ``env()``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        with_kafka: bool = False,
        nats_port: int | None = None,
        postgres_port: int | None = None,
        redis_port: int | None = None,
        kafka_port: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.nats = NatsServer(self.data_dir / "nats", nats_port)
        self.postgres = PostgresServer(self.data_dir / "postgres", postgres_port)
        self.redis = RedisServer(self.data_dir / "valkey", redis_port)
        self.kafka = KafkaServer(self.data_dir / "kafka", kafka_port) if with_kafka else None

    @property
    def servers(self) -> list[ManagedProcess]:
        """The servers in start order (``stop()`` goes in reverse)."""
        servers: list[ManagedProcess] = [self.nats, self.postgres, self.redis]
        if self.kafka is not None:
            servers.append(self.kafka)
        return servers

    def start(self, timeout: float | None = None) -> Self:
        """Start every server and create the hub's database; blocks until all answer.

        The slow parts (initdb, Maven, Kafka's storage format, waiting for readiness) run
        in worker threads; the servers themselves are spawned from the calling thread so
        that the parent-death signal stays tied to it (see ``hub.stack._process``).
        """
        try:
            self._each(lambda server: server.prepare())
            for server in self.servers:
                server.spawn()
            self._each(lambda server: server.wait_ready(timeout))
            self.postgres.create_database_if_missing(DATABASE)
        except BaseException:
            self.stop()
            raise
        log.info("stack.started", servers=[name for name, _ in self.describe()])
        return self

    def _each(self, step: Callable[[ManagedProcess], None]) -> None:
        servers = self.servers
        with ThreadPoolExecutor(len(servers), thread_name_prefix="hub-stack") as pool:
            futures = [pool.submit(step, server) for server in servers]
        errors = [exc for future in futures if (exc := future.exception()) is not None]
        if errors:
            raise errors[0]

    def stop(self) -> None:
        """Stop every server, in reverse start order. Idempotent."""
        for server in reversed(self.servers):
            server.stop()

    def env(self) -> dict[str, str]:
        """The hub's environment variables pointing at this stack."""
        env = {
            "NATS_URL": self.nats.url,
            "POSTGRES_HOST": self.postgres.host,
            "POSTGRES_PORT": str(self.postgres.port),
            "POSTGRES_DB": DATABASE,
            "POSTGRES_USER": self.postgres.user,
            "POSTGRES_PASSWORD": self.postgres.password,
            "DRAGONFLY_HOST": self.redis.host,
            "DRAGONFLY_PORT": str(self.redis.port),
            "DRAGONFLY_PASSWORD": "",
            "HUB_EVENT_LOG": "kafka" if self.kafka is not None else "jetstream",
        }
        if self.kafka is not None:
            env["KAFKA_BROKERS"] = self.kafka.bootstrap
        return env

    def describe(self) -> list[tuple[str, str]]:
        """(server, where it listens) pairs, for printing."""
        lines = [
            ("NATS + JetStream", f"{self.nats.url}  (monitoring {self.nats.monitor_url})"),
            ("PostgreSQL 16", self.postgres.dsn(DATABASE)),
            ("Valkey (Redis protocol)", self.redis.url),
        ]
        if self.kafka is not None:
            lines.append(("Kafka (KRaft)", self.kafka.bootstrap))
        return lines

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
