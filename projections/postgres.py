"""PostgreSQL projection of the registry: ``service_registry``, ``input_rejections`` and
``health_history``.

A batch is applied by folding its events over the rows they touch (read in one
query) with the same pure ``evolve`` as the hub, then writing each changed row
once (multi-row upsert) — many heartbeats of one instance become one write, and
the result is by construction what applying the events one by one gives.
Rows and the checkpoint are written in one transaction; records the checkpoint
already covers are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from events.log import LogRecord, Positions, advance, unseen
from events.model import HEALTH_EVENTS, Event, InputRejected
from handlers.registry import InstanceEvent, InstanceKey, RegistryState, evolve, key_of
from projections.port import ViewMismatch
from projections.render import (
    HISTORY_COLUMNS,
    REGISTRY_COLUMNS,
    REJECTION_COLUMNS,
    ViewState,
    canonical_pg,
    differences,
    expected_pg,
    instance_from_pg,
    pg_history_row,
    pg_registry_row,
    pg_rejection_row,
    row_id,
)
from projections.schema import migrate

_TYPES = {
    "port": "integer", "registered_at": "timestamptz", "last_seen": "timestamptz",
    "contract_validated": "boolean", "heartbeat_interval_s": "double precision",
    "load": "double precision", "metadata": "jsonb", "transport_preferences": "jsonb",
    "depends_on": "jsonb", "ttl_s": "double precision", "expire_after_s": "double precision",
    "status_since": "timestamptz", "flapping": "boolean", "checks": "jsonb",
}  # fmt: skip
_UPSERT = (
    f"INSERT INTO service_registry ({', '.join(REGISTRY_COLUMNS)}) SELECT "
    + ", ".join(
        f"c{i}::{_TYPES.get(c, 'text')}" if _TYPES.get(c) == "jsonb" else f"c{i}"
        for i, c in enumerate(REGISTRY_COLUMNS)
    )
    + " FROM unnest("
    + ", ".join(
        f"${i + 1}::{'text' if _TYPES.get(c) == 'jsonb' else _TYPES.get(c, 'text')}[]"
        for i, c in enumerate(REGISTRY_COLUMNS)
    )
    + ") AS u("
    + ", ".join(f"c{i}" for i in range(len(REGISTRY_COLUMNS)))
    + ") ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in REGISTRY_COLUMNS[1:])
)
_REJECTED = (
    f"INSERT INTO input_rejections ({', '.join(REJECTION_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(REJECTION_COLUMNS)))}) "
    "ON CONFLICT (event_id) DO NOTHING"
)
_HISTORY = (
    f"INSERT INTO health_history ({', '.join(HISTORY_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(HISTORY_COLUMNS)))}) "
    "ON CONFLICT (event_id) DO NOTHING"
)
_CHECKPOINT = """
INSERT INTO projection_checkpoints (projection, partition, position) VALUES ($1, $2, $3)
ON CONFLICT (projection, partition) DO UPDATE SET position = EXCLUDED.position, updated_at = now()
"""
TABLES = {
    "service_registry": ("id", REGISTRY_COLUMNS),
    "input_rejections": ("event_id", REJECTION_COLUMNS),
    "health_history": ("event_id", HISTORY_COLUMNS),
}


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
            # Read under a row lock: two writers of one projection cannot both apply.
            rows = await conn.fetch(
                "SELECT partition, position FROM projection_checkpoints"
                " WHERE projection = $1 FOR UPDATE",
                self.name,
            )
            checkpoint = {r["partition"]: r["position"] for r in rows}
            todo = unseen(records, checkpoint)
            if not todo:
                return checkpoint
            await self._write(conn, todo)
            new = advance(checkpoint, todo)
            await conn.executemany(
                _CHECKPOINT, [(self.name, p, n) for p, n in new.items() if n != checkpoint.get(p)]
            )
            return new

    @staticmethod
    async def _write(conn: asyncpg.Connection, todo: Sequence[LogRecord]) -> None:
        touched: set[InstanceKey] = set()
        rejections: list[InputRejected] = []
        history: list[Event] = []
        for r in todo:
            e = r.event
            if isinstance(e, InstanceEvent):
                touched.add(key_of(e))
            if isinstance(e, InputRejected):
                rejections.append(e)
            elif isinstance(e, HEALTH_EVENTS):
                history.append(e)
        if touched:
            existing = await conn.fetch(
                "SELECT * FROM service_registry WHERE id = ANY($1::text[])",
                [row_id(*k) for k in touched],
            )
            state = RegistryState()
            for row in existing:
                inst = instance_from_pg(row)
                state.instances[(inst.tenant, inst.service_name, inst.instance_id)] = inst
            for r in todo:
                evolve(state, r.event)
            changed = [pg_registry_row(state.instances[k]) for k in touched
                       if k in state.instances]  # fmt: skip
            if changed:
                await conn.execute(_UPSERT, *map(list, zip(*changed, strict=True)))
        if rejections:
            await conn.executemany(_REJECTED, [pg_rejection_row(e) for e in rejections])
        if history:
            await conn.executemany(_HISTORY, [pg_history_row(e) for e in history])

    # --- verify and rebuild ----------------------------------------------------------

    async def snapshot(self) -> tuple[Positions, dict[str, str]]:
        """The checkpoint and every row, canonical, read in one consistent snapshot."""
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            checkpoint = {
                r["partition"]: r["position"]
                for r in await conn.fetch(
                    "SELECT partition, position FROM projection_checkpoints WHERE projection = $1",
                    self.name,
                )
            }
            return checkpoint, await self._canonical(conn, "")

    @staticmethod
    async def _canonical(conn: asyncpg.Connection, suffix: str) -> dict[str, str]:
        lines: dict[str, str] = {}
        for table, (key, columns) in TABLES.items():
            for row in await conn.fetch(f"SELECT {', '.join(columns)} FROM {table}{suffix}"):
                lines[f"{table}/{row[key]}"] = canonical_pg(table, columns, tuple(row))
        return lines

    async def rebuild(self, view: ViewState, positions: Positions) -> None:
        """Build the view of ``view`` (the fold up to ``positions``) in shadow tables,
        check it equals the fold, then swap it in atomically with its checkpoint.
        Readers see the old view until the swap commits."""
        suffix = "__replay"
        async with self._pool.acquire() as conn:
            for table in TABLES:
                await conn.execute(f"DROP TABLE IF EXISTS {table}{suffix}")
                await conn.execute(f"CREATE TABLE {table}{suffix} (LIKE {table} INCLUDING ALL)")
            registry = [pg_registry_row(i) for i in view.registry.instances.values()]
            await conn.copy_records_to_table(
                f"service_registry{suffix}", records=registry, columns=REGISTRY_COLUMNS
            )
            rejected = [pg_rejection_row(e) for e in view.rejections.values()]
            await conn.copy_records_to_table(
                f"input_rejections{suffix}", records=rejected, columns=REJECTION_COLUMNS
            )
            history = [pg_history_row(e) for e in view.history.values()]
            await conn.copy_records_to_table(
                f"health_history{suffix}", records=history, columns=HISTORY_COLUMNS
            )
            problems = differences(expected_pg(view), await self._canonical(conn, suffix))
            if problems:
                raise ViewMismatch("\n".join(problems[:20]))
            async with conn.transaction():
                for table, (_, columns) in TABLES.items():
                    await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                    await conn.execute(f"TRUNCATE {table}")
                    cols = ", ".join(columns)
                    await conn.execute(
                        f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {table}{suffix}"
                    )
                await conn.execute(
                    "DELETE FROM projection_checkpoints WHERE projection = $1", self.name
                )
                await conn.executemany(
                    _CHECKPOINT, [(self.name, p, n) for p, n in positions.items()]
                )
            for table in TABLES:
                await conn.execute(f"DROP TABLE {table}{suffix}")
