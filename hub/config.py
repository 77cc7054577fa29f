"""Twelve-factor configuration: the seed's environment variables plus the hub's own.

Every variable the hub reads is listed in ``ENV_VARS`` so that deployment files
(``compose/``) can be checked against it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from events.names import TENANT_PATTERN
from handlers.registry import LivenessPolicy

# Every environment variable the hub reads, and what it means.
ENV_VARS: dict[str, str] = {
    "POSTGRES_HOST": "PostgreSQL host",
    "POSTGRES_PORT": "PostgreSQL port",
    "POSTGRES_DB": "PostgreSQL database",
    "POSTGRES_USER": "PostgreSQL user",
    "POSTGRES_PASSWORD": "PostgreSQL password (may be empty)",
    "DRAGONFLY_HOST": "DragonflyDB / Redis-protocol server host",
    "DRAGONFLY_PORT": "DragonflyDB / Redis-protocol server port",
    "DRAGONFLY_PASSWORD": "DragonflyDB password (may be empty)",
    "NATS_URL": "NATS servers, comma separated",
    "KAFKA_BROKERS": "Kafka bootstrap servers, comma separated",
    "HUB_EVENT_LOG": "event log adapter: 'kafka' or 'jetstream'",
    "HUB_KAFKA_TOPIC": "Kafka topic of the event log",
    "HUB_TENANTS": "comma separated allow-list of tenants; empty = any valid tenant name",
    "HUB_LOG_FORMAT": "'json' or 'console'",
    "HUB_KAFKA_SEGMENT_MS": "Kafka log segment age before compaction may clean it (ms)",
    "HUB_EXPIRE_AFTER_S": "default time an instance stays critical before it expires",
    "HUB_FLAP_WINDOW_S": "window in which health changes are counted for flap detection",
    "HUB_FLAP_THRESHOLD": "health changes within the window that mark an instance flapping",
    "HUB_FLAP_QUIET_S": "time without changes after which a flapping instance is stable",
    "HUB_PRESERVATION_SHARE": "share of a tenant's instances critical at once that starts "
    "self-preservation (0..1)",
    "HUB_PRESERVATION_MIN": "minimum number of critical instances for self-preservation",
    "HUB_PRESERVATION_MAX_S": "the bound: self-preservation ends by itself after this",
    "HUB_TICK_S": "longest wait of the ingest loop between two looks at the timer (lagging, "
    "the connection); the timer itself wakes at each deadline",
    "HUB_INFRA_CONFIG": "path of infrastructure.yaml (empty: only the hub's own stack)",
    "HUB_ALERTS_FILE": "path of the alert rules file (empty: the alerts: section of "
    "HUB_INFRA_CONFIG, else the default rules)",
    "HUB_INFRA_SELF": "'1' (default) to also monitor the hub's own servers, '0' not to",
    "HUB_INFRA_FAILURES": "consecutive failed checks that make a healthy component UNHEALTHY",
    "HUB_INFRA_HISTORY_DAYS": "days of raw check results kept in PostgreSQL infra_checks",
    "HUB_VIEW_CACHE": "live instances each projection keeps in memory to fold batches "
    "without reading them back (0: none)",
    "HUB_INGEST_BATCH": "ingress messages fetched, decided and appended per batch (at most)",
    "HUB_WRITER_LEASE_S": "the writer lease: a hub that has not renewed it for this long is no "
    "longer the writer, and a standby takes over",
    "HUB_MAX_DELIVER": "deliveries of one ingress message the hub failed on before it is "
    "dead-lettered with INTERNAL_ERROR",
    "HUB_LOG_STALL_S": "an append not done after this long is reported (log line, "
    "hub.query.status, hub.events._hub.log_stalled)",
    "HUB_QUERY_SERVERS": "query-server processes the hub starts and supervises (0: none; "
    "run 'hub query-server' elsewhere)",
    "HUB_QUERY_TIMEOUT_S": "a query whose view store does not answer within this long is "
    "answered UNAVAILABLE",
}

# Numeric settings read from the environment: variable -> (field, type, lower bound).
_NUMERIC: dict[str, tuple[str, type, float]] = {
    "HUB_KAFKA_SEGMENT_MS": ("kafka_segment_ms", int, 1),
    "HUB_EXPIRE_AFTER_S": ("expire_after_s", float, 0.001),
    "HUB_FLAP_WINDOW_S": ("flap_window_s", float, 0.001),
    "HUB_FLAP_THRESHOLD": ("flap_threshold", int, 2),
    "HUB_FLAP_QUIET_S": ("flap_quiet_s", float, 0.001),
    "HUB_PRESERVATION_SHARE": ("preservation_share", float, 0.0),
    "HUB_PRESERVATION_MIN": ("preservation_min", int, 1),
    "HUB_PRESERVATION_MAX_S": ("preservation_max_s", float, 0.001),
    "HUB_TICK_S": ("tick_s", float, 0.01),
    "HUB_INFRA_FAILURES": ("infra_failures", int, 1),
    "HUB_INFRA_HISTORY_DAYS": ("infra_history_days", float, 0.0001),
    "HUB_VIEW_CACHE": ("view_cache", int, 0),
    "HUB_INGEST_BATCH": ("ingest_batch", int, 1),
    "HUB_WRITER_LEASE_S": ("writer_lease_s", float, 0.5),
    "HUB_MAX_DELIVER": ("max_deliver", int, 1),
    "HUB_LOG_STALL_S": ("log_stall_s", float, 0.01),
    "HUB_QUERY_SERVERS": ("query_servers", int, 0),
    "HUB_QUERY_TIMEOUT_S": ("query_timeout_s", float, 0.01),
}


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


@dataclass(frozen=True)
class HubConfig:
    """Everything the hub process needs to know about its surroundings."""

    nats_urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    postgres_host: str = "127.0.0.1"
    postgres_port: int = 5432
    postgres_db: str = "central_hub"
    postgres_user: str = "postgres"
    postgres_password: str = ""
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_password: str = ""
    redis_db: int = 0
    event_log: str = "jetstream"
    kafka_brokers: tuple[str, ...] = ("127.0.0.1:9092",)
    kafka_topic: str = "hub.events"
    kafka_partitions: int = 6
    tenants: frozenset[str] = field(default_factory=frozenset)
    log_format: str = "console"
    # Ingress limits.
    max_message_bytes: int = 64 * 1024
    max_metadata_bytes: int = 8 * 1024
    # Up to this many per fetch: a fetch returns what is there, so a small load is
    # not held back. Under load the next batch is fetched while one is recorded, and
    # a batch spreads the waits for the server (fetch, PubAck) over more messages
    # (bench/ingest: 1,000 -> ~13,000 hb/s, 4,000 -> ~14,500, 8,000 -> ~16,900); the
    # price is a batch's time under full load (~0.3 s at 4,000), by which the lease
    # timer, run between batches, can be late.
    ingest_batch: int = 4000
    # Read-your-writes: how long a query with min_seq may wait.
    min_seq_wait_s: float = 5.0
    # The event log's compaction (Kafka; JetStream rolls heartbeats up at once).
    kafka_segment_ms: int = 10 * 60 * 1000
    # Liveness (see handlers.registry.LivenessPolicy).
    expire_after_s: float = LivenessPolicy.expire_after_s
    flap_window_s: float = LivenessPolicy.flap_window_s
    flap_threshold: int = LivenessPolicy.flap_threshold
    flap_quiet_s: float = LivenessPolicy.flap_quiet_s
    preservation_share: float = LivenessPolicy.preservation_share
    preservation_min: int = LivenessPolicy.preservation_min
    preservation_max_s: float = LivenessPolicy.preservation_max_s
    tick_s: float = 0.25
    # Infrastructure monitor.
    infra_config: str = ""
    infra_self: bool = True
    infra_failures: int = LivenessPolicy.infra_failures_to_trip
    infra_history_days: float = 7.0
    view_cache: int = 50_000
    # One writer per ingress stream (hub.writer): the lease's length. A hub that died
    # without releasing it is replaced this long after its last renewal at the latest.
    writer_lease_s: float = 10.0
    # An ingress message delivered this often without being recorded (the hub failed on
    # it each time) is dead-lettered with INTERNAL_ERROR instead of being tried again.
    max_deliver: int = 5
    # An append still not done after this long is reported as a stalled log.
    log_stall_s: float = 2.0
    # hub.query.* is answered by query-server processes (hub.query_server): this many are
    # started and supervised by the hub (0: none, they run elsewhere).
    query_servers: int = 1
    # The view store's time to answer a query (its reads, after any min_seq wait);
    # past it the query is answered UNAVAILABLE.
    query_timeout_s: float = 2.0

    @property
    def liveness(self) -> LivenessPolicy:
        return LivenessPolicy(
            expire_after_s=self.expire_after_s, flap_window_s=self.flap_window_s,
            flap_threshold=self.flap_threshold, flap_quiet_s=self.flap_quiet_s,
            preservation_share=self.preservation_share, preservation_min=self.preservation_min,
            preservation_max_s=self.preservation_max_s,
            infra_failures_to_trip=self.infra_failures,
        )  # fmt: skip

    @property
    def postgres_dsn(self) -> str:
        auth = self.postgres_user
        if self.postgres_password:
            auth += ":" + self.postgres_password
        return f"postgresql://{auth}@{self.postgres_host}:{self.postgres_port}/{self.postgres_db}"

    def tenant_allowed(self, tenant: str) -> bool:
        return not self.tenants or tenant in self.tenants

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HubConfig:
        """Read the configuration from environment variables (``os.environ`` by default)."""
        env = os.environ if env is None else env
        d = cls()

        def get(name: str, default: str) -> str:
            value = env.get(name, "").strip()
            return value or default

        def port(name: str, default: int) -> int:
            raw = get(name, str(default))
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r}: not an integer port") from None
            if not 0 < value < 65536:
                raise ConfigError(f"{name}={raw!r}: port out of range 1..65535")
            return value

        event_log = get("HUB_EVENT_LOG", d.event_log).lower()
        if event_log not in ("kafka", "jetstream"):
            raise ConfigError(f"HUB_EVENT_LOG={event_log!r}: expected 'kafka' or 'jetstream'")
        log_format = get("HUB_LOG_FORMAT", d.log_format).lower()
        if log_format not in ("json", "console"):
            raise ConfigError(f"HUB_LOG_FORMAT={log_format!r}: expected 'json' or 'console'")
        tenants = frozenset(t.strip() for t in env.get("HUB_TENANTS", "").split(",") if t.strip())
        for tenant in tenants:
            if not re.fullmatch(TENANT_PATTERN, tenant):
                raise ConfigError(f"HUB_TENANTS: {tenant!r} is not a valid tenant name")
        numeric: dict[str, float | int] = {}
        for name, (attr, kind, lowest) in _NUMERIC.items():
            raw = env.get(name, "").strip()
            if not raw:
                continue
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r}: not a number ({kind.__name__})") from None
            if not value >= lowest or (attr == "preservation_share" and value > 1):
                raise ConfigError(f"{name}={raw!r}: out of range")
            numeric[attr] = value
        return cls(
            **numeric,  # type: ignore[arg-type]
            nats_urls=tuple(u.strip() for u in get("NATS_URL", ",".join(d.nats_urls)).split(",")),
            postgres_host=get("POSTGRES_HOST", d.postgres_host),
            postgres_port=port("POSTGRES_PORT", d.postgres_port),
            postgres_db=get("POSTGRES_DB", d.postgres_db),
            postgres_user=get("POSTGRES_USER", d.postgres_user),
            postgres_password=env.get("POSTGRES_PASSWORD", ""),
            redis_host=get("DRAGONFLY_HOST", d.redis_host),
            redis_port=port("DRAGONFLY_PORT", d.redis_port),
            redis_password=env.get("DRAGONFLY_PASSWORD", ""),
            event_log=event_log,
            kafka_brokers=tuple(
                b.strip() for b in get("KAFKA_BROKERS", ",".join(d.kafka_brokers)).split(",")
            ),
            kafka_topic=get("HUB_KAFKA_TOPIC", d.kafka_topic),
            tenants=tenants,
            log_format=log_format,
            infra_config=env.get("HUB_INFRA_CONFIG", "").strip(),
            infra_self=get("HUB_INFRA_SELF", "1") not in ("0", "false", "no"),
        )

    def to_env(self) -> dict[str, str]:
        """The environment that makes ``from_env`` return this configuration."""
        return {
            "NATS_URL": ",".join(self.nats_urls),
            "POSTGRES_HOST": self.postgres_host,
            "POSTGRES_PORT": str(self.postgres_port),
            "POSTGRES_DB": self.postgres_db,
            "POSTGRES_USER": self.postgres_user,
            "POSTGRES_PASSWORD": self.postgres_password,
            "DRAGONFLY_HOST": self.redis_host,
            "DRAGONFLY_PORT": str(self.redis_port),
            "DRAGONFLY_PASSWORD": self.redis_password,
            "HUB_EVENT_LOG": self.event_log,
            "KAFKA_BROKERS": ",".join(self.kafka_brokers),
            "HUB_KAFKA_TOPIC": self.kafka_topic,
            "HUB_TENANTS": ",".join(sorted(self.tenants)),
            "HUB_LOG_FORMAT": self.log_format,
            "HUB_INFRA_CONFIG": self.infra_config,
            "HUB_INFRA_SELF": "1" if self.infra_self else "0",
        } | {name: str(getattr(self, attr)) for name, (attr, _, _) in _NUMERIC.items()}
