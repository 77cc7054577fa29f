"""PostgreSQL projection of the registry: ``service_registry`` and ``input_rejections``.

Rows and the checkpoint are written in one transaction; records the checkpoint
already covers are skipped, so applying a batch twice changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from events.log import LogRecord, Positions, advance, unseen
from events.model import HeartbeatReceived, InputRejected, ServiceDeregistered, ServiceRegistered
from projections.schema import migrate

_REGISTER = """
INSERT INTO service_registry AS r (
    id, tenant_id, service_name, instance_id, host, port, protocol, health_endpoint, version,
    metadata, status, registered_at, last_seen, transport_preferences, heartbeat_interval_s,
    depends_on)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, 'healthy', $11, $11, $12::jsonb, $13,
        $14::jsonb)
ON CONFLICT (id) DO UPDATE SET
    host = EXCLUDED.host, port = EXCLUDED.port, protocol = EXCLUDED.protocol,
    health_endpoint = EXCLUDED.health_endpoint, version = EXCLUDED.version,
    metadata = EXCLUDED.metadata, transport_preferences = EXCLUDED.transport_preferences,
    heartbeat_interval_s = EXCLUDED.heartbeat_interval_s, depends_on = EXCLUDED.depends_on,
    status = 'healthy',
    registered_at = CASE WHEN r.status = 'deregistered' THEN EXCLUDED.registered_at
                         ELSE r.registered_at END,
    last_seen = CASE WHEN r.status = 'deregistered' THEN EXCLUDED.last_seen
                     ELSE greatest(r.last_seen, EXCLUDED.last_seen) END,
    load = CASE WHEN r.status = 'deregistered' THEN NULL ELSE r.load END
"""
_HEARTBEAT = """
UPDATE service_registry SET status = $2, last_seen = greatest(last_seen, $3), load = $4
WHERE id = $1 AND status <> 'deregistered'
"""
_DEREGISTER = "UPDATE service_registry SET status = 'deregistered' WHERE id = $1"
_REJECTED = """
INSERT INTO input_rejections (event_id, tenant_id, ingress_seq, subject, reason_code, reason,
                              excerpt, ts)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (event_id) DO NOTHING
"""
_CHECKPOINT = """
INSERT INTO projection_checkpoints (projection, partition, position) VALUES ($1, $2, $3)
ON CONFLICT (projection, partition) DO UPDATE SET position = EXCLUDED.position, updated_at = now()
"""


def ts(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def row_id(tenant: str, service: str, instance: str) -> str:
    return f"{tenant}/{service}/{instance}"


class PostgresRegistryProjection:
    """The registry view in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool, *, name: str = "postgres-registry") -> None:
        self._pool = pool
        self.name = name

    async def setup(self) -> None:
        async with self._pool.acquire() as conn:
            await migrate(conn)

    async def checkpoint(self) -> Positions:
        rows = await self._pool.fetch(
            "SELECT partition, position FROM projection_checkpoints WHERE projection = $1",
            self.name,
        )
        return {r["partition"]: r["position"] for r in rows}

    async def apply(self, records: Sequence[LogRecord]) -> Positions:
        async with self._pool.acquire() as conn, conn.transaction():
            # The checkpoint is read inside the transaction, under a row lock, so two
            # writers of the same projection cannot both apply the same records.
            rows = await conn.fetch(
                "SELECT partition, position FROM projection_checkpoints"
                " WHERE projection = $1 FOR UPDATE",
                self.name,
            )
            checkpoint = {r["partition"]: r["position"] for r in rows}
            todo = unseen(records, checkpoint)
            if not todo:
                return checkpoint
            for record in todo:
                await self._apply_one(conn, record)
            new = advance(checkpoint, todo)
            await conn.executemany(
                _CHECKPOINT,
                [(self.name, p, n) for p, n in new.items() if n != checkpoint.get(p)],
            )
            return new

    @staticmethod
    async def _apply_one(conn: asyncpg.Connection, record: LogRecord) -> None:
        e = record.event
        match e:
            case ServiceRegistered():
                await conn.execute(
                    _REGISTER,
                    row_id(e.tenant, e.service_name, e.instance_id),
                    e.tenant,
                    e.service_name,
                    e.instance_id,
                    e.host,
                    e.port,
                    e.protocol,
                    e.health_endpoint,
                    e.version,
                    json.dumps(e.metadata, sort_keys=True),
                    ts(e.ts),
                    json.dumps(e.transport_preferences),
                    e.heartbeat_interval_s,
                    json.dumps(e.depends_on),
                )
            case HeartbeatReceived():
                await conn.execute(
                    _HEARTBEAT,
                    row_id(e.tenant, e.service_name, e.instance_id),
                    e.status,
                    ts(e.ts),
                    e.load,
                )
            case ServiceDeregistered():
                await conn.execute(_DEREGISTER, row_id(e.tenant, e.service_name, e.instance_id))
            case InputRejected():
                await conn.execute(
                    _REJECTED,
                    e.event_id,
                    e.tenant,
                    e.ingress_seq,
                    e.subject,
                    e.reason_code,
                    e.reason,
                    e.excerpt,
                    ts(e.ts),
                )
            case _:
                pass
