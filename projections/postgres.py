"""PostgreSQL projection of the registry (``service_registry``, ``input_rejections``,
``health_history``), of the infrastructure (``infra_status``, ``infra_history``,
``infra_config``; plus the ``infra_checks`` journal) and of the alerts (``alerts``,
``alert_notifications``, ``alert_silences``, ``alert_config``).

A batch is planned (``projections.batch``, as the Redis view does): folded over the
rows it touches (from the projection's cache of what it last wrote, else read in one
query) with the same pure ``evolve`` as the hub, then each changed row written once
(multi-row upsert; rows that only got heartbeats: one multi-row UPDATE of the
heartbeat columns) — many heartbeats of one instance become one write, and the
result is by construction what applying the events one by one gives.
Rows and the checkpoint are written in one transaction; records the checkpoint
already covers are skipped. A checkpoint found missing or behind what this projection
applied (the tables were emptied, or restored from an older copy) means the view was
lost: ``ViewLost``, nothing written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import asyncpg

from events.log import LogRecord, Positions, advance, unseen
from events.model import Event, InfraChecked, InfraConfigLoaded, InfraStatusChanged
from handlers.infra import InfraState, fold_infra
from handlers.registry import GONE, Instance, InstanceKey
from projections.alert_view import RESOLVED, AlertKeys, AlertView, keys_of
from projections.batch import BatchPlan, fold_instances, plan_batch
from projections.cache import InstanceCache
from projections.canonical import HEARTBEAT_FIELDS, differences, from_json
from projections.fold import ViewState
from projections.port import ViewLost, ViewMismatch, behind
from projections.postgres_render import (
    ALERT_COLUMNS,
    ALERT_CONFIG_COLUMNS,
    HISTORY_COLUMNS,
    INFRA_COLUMNS,
    INFRA_CONFIG_COLUMNS,
    INFRA_HISTORY_COLUMNS,
    NOTIFICATION_COLUMNS,
    POSTGRES_RENDERING,
    REGISTRY_COLUMNS,
    REJECTION_COLUMNS,
    SILENCE_COLUMNS,
    alert_from_pg,
    canonical_pg,
    expected_pg,
    infra_from_pg,
    instance_from_pg,
    notification_from_pg,
    pg_alert_config_row,
    pg_alert_row,
    pg_heartbeat_row,
    pg_history_row,
    pg_infra_config_row,
    pg_infra_history_row,
    pg_infra_row,
    pg_notification_row,
    pg_registry_row,
    pg_rejection_row,
    pg_silence_row,
    row_id,
    silence_from_pg,
    ts,
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
# Heartbeat-only changes: just those columns, for many rows in one statement.
_HEARTBEATS = (
    "UPDATE service_registry AS r SET "
    + ", ".join(
        f"{c} = u.{c}::jsonb" if _TYPES.get(c) == "jsonb" else f"{c} = u.{c}"
        for c in HEARTBEAT_FIELDS
    )
    + " FROM unnest($1::text[], "
    + ", ".join(
        f"${i + 2}::{'text' if _TYPES.get(c) == 'jsonb' else _TYPES.get(c, 'text')}[]"
        for i, c in enumerate(HEARTBEAT_FIELDS)
    )
    + f") AS u(id, {', '.join(HEARTBEAT_FIELDS)}) WHERE r.id = u.id"
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


def _insert(table: str, columns: Sequence[str], conflict: str, update: bool = False) -> str:
    action = (
        "DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in columns[1:])
        if update
        else "DO NOTHING"
    )
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) "
        f"VALUES ({', '.join(f'${i + 1}' for i in range(len(columns)))}) "
        f"ON CONFLICT ({conflict}) {action}"
    )


_INFRA = _insert("infra_status", INFRA_COLUMNS, "component", update=True)
_INFRA_HISTORY = _insert("infra_history", INFRA_HISTORY_COLUMNS, "event_id")
_INFRA_CONFIG = _insert("infra_config", INFRA_CONFIG_COLUMNS, "id", update=True)
_ALERT = _insert("alerts", ALERT_COLUMNS, "id", update=True)
_NOTIFICATION = _insert("alert_notifications", NOTIFICATION_COLUMNS, "notification_id",
                        update=True)  # fmt: skip
_SILENCE = _insert("alert_silences", SILENCE_COLUMNS, "silence_id", update=True)
_ALERT_CONFIG = _insert("alert_config", ALERT_CONFIG_COLUMNS, "id", update=True)
_INFRA_CHECK = (
    "INSERT INTO infra_checks (event_id, component, status, response_time_ms, error, ts)"
    " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING"
)
_CHECKPOINT = """
INSERT INTO projection_checkpoints (projection, partition, position) VALUES ($1, $2, $3)
ON CONFLICT (projection, partition) DO UPDATE SET position = EXCLUDED.position, updated_at = now()
"""
TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "service_registry": ("id", REGISTRY_COLUMNS),
    "input_rejections": ("event_id", REJECTION_COLUMNS),
    "health_history": ("event_id", HISTORY_COLUMNS),
    "infra_status": ("component", INFRA_COLUMNS),
    "infra_history": ("event_id", INFRA_HISTORY_COLUMNS),
    "infra_config": ("id", INFRA_CONFIG_COLUMNS),
    "alerts": ("id", ALERT_COLUMNS),
    "alert_notifications": ("notification_id", NOTIFICATION_COLUMNS),
    "alert_silences": ("silence_id", SILENCE_COLUMNS),
    "alert_config": ("id", ALERT_CONFIG_COLUMNS),
}
_REBUILD_LOCK_ID = 0x48554252  # "HUBR": one rebuild at a time across processes
# Not a view of the fold (the log keeps only each component's latest result), so not
# verified nor rebuilt: a journal of raw check results, pruned by age.
JOURNAL = "infra_checks"
# Every table the projection writes (what a test empties to lose the view).
WRITTEN_TABLES = (*TABLES, JOURNAL)


class PostgresRegistryProjection:
    """The registry view in PostgreSQL."""

    rendering = POSTGRES_RENDERING

    def __init__(
        self, pool: asyncpg.Pool, *, name: str = "postgres-registry",
        journal_days: float = 7.0, clock: Callable[[], float] = time.time,
        cache: int = 50_000,
    ) -> None:  # fmt: skip
        self._pool = pool
        self.name = name
        self._journal_days = journal_days
        self._clock = clock
        self._pruned_at = 0.0
        self._cache: InstanceCache[Instance] = InstanceCache(cache)
        # What the view holds at least: the checkpoint this projection last attached to,
        # committed or rebuilt. A checkpoint found behind it means the view was lost.
        self._floor: Positions = {}

    async def setup(self) -> None:
        async with self._pool.acquire() as conn:
            await migrate(conn)

    async def warm(self) -> None:
        """Read the live instances (up to the cache's limit, most recently seen first)
        into the cache, with the checkpoint, in one snapshot."""
        if not self._cache.limit:
            return
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            rows = await conn.fetch(
                "SELECT partition, position FROM projection_checkpoints WHERE projection = $1",
                self.name,
            )
            at = {r["partition"]: r["position"] for r in rows}
            live = await conn.fetch(
                "SELECT * FROM service_registry WHERE status <> ALL($1::text[])"
                " ORDER BY last_seen DESC LIMIT $2",
                sorted(GONE), self._cache.limit,
            )  # fmt: skip
        entries: dict[InstanceKey, Instance] = {}
        for row in reversed(live):  # the most recently seen go last: dropped last
            inst = instance_from_pg(row)
            entries[(inst.tenant, inst.service_name, inst.instance_id)] = inst
        self._cache.load(entries, at)

    async def checkpoint(self) -> Positions:
        rows = await self._pool.fetch(
            "SELECT partition, position FROM projection_checkpoints WHERE projection = $1",
            self.name,
        )
        return {r["partition"]: r["position"] for r in rows}

    async def attach(self) -> Positions:
        at = await self.checkpoint()
        if (why := behind(at, self._floor)) is not None:
            raise ViewLost(why)
        self._floor = at
        return at

    async def examine(self) -> list[str]:
        if (why := behind(await self.checkpoint(), self._floor)) is not None:
            raise ViewLost(why)
        return []

    async def mark(self, state: str, reason: str = "") -> None:
        """Queries do not read this view: nobody to tell."""
        return None

    async def apply(self, records: Sequence[LogRecord]) -> Positions:
        async with self._pool.acquire() as conn, conn.transaction():
            # Read under a row lock: two writers of one projection cannot both apply.
            rows = await conn.fetch(
                "SELECT partition, position FROM projection_checkpoints"
                " WHERE projection = $1 FOR UPDATE",
                self.name,
            )
            checkpoint = {r["partition"]: r["position"] for r in rows}
            if (why := behind(checkpoint, self._floor)) is not None:
                self._cache.clear()
                raise ViewLost(why)  # rolls the transaction back: nothing written
            todo = unseen(records, checkpoint)
            if not todo:
                return checkpoint
            self._cache.valid_at(checkpoint)
            try:
                plan = plan_batch(todo)
                written = await self._write(conn, plan)
                await self._write_infra(conn, plan.infra)
                await self._write_alerts(conn, plan.alerts)
                new = advance(checkpoint, todo)
                await conn.executemany(
                    _CHECKPOINT,
                    [(self.name, p, n) for p, n in new.items() if n != checkpoint.get(p)],
                )
            except BaseException:
                self._cache.clear()  # its instances may be folded further than written
                raise
        # Committed (leaving the block without an exception commits).
        self._cache.remember(written, new)
        self._floor = new
        return new

    async def _write(
        self, conn: asyncpg.Connection, plan: BatchPlan
    ) -> dict[InstanceKey, Instance | None]:
        """Fold the batch over the rows it touches and write them; returns each touched
        instance as written (None: not in the table)."""
        written: dict[InstanceKey, Instance | None] = {}
        if plan.instances:
            known: dict[InstanceKey, Instance] = {}
            cached = self._cache.entries
            for k in plan.instances:
                if (inst := cached.get(k)) is not None:
                    known[k] = inst
            unknown = [row_id(*k) for k in plan.instances if k not in known]
            if unknown:
                rows = await conn.fetch(
                    "SELECT * FROM service_registry WHERE id = ANY($1::text[]) FOR UPDATE",
                    unknown,
                )
                for row in rows:
                    inst = instance_from_pg(row)
                    known[(inst.tenant, inst.service_name, inst.instance_id)] = inst
            changed, beats = [], []
            for k, inst, heartbeats_only in fold_instances(plan, known, exact=cached):
                if inst is None or cached.get(k) is not inst:
                    written[k] = inst
                if inst is None:
                    continue
                if heartbeats_only:
                    beats.append(pg_heartbeat_row(inst))
                else:
                    changed.append(pg_registry_row(inst))
            if changed:
                await conn.execute(_UPSERT, *map(list, zip(*changed, strict=True)))
            if beats:
                await conn.execute(_HEARTBEATS, *map(list, zip(*beats, strict=True)))
        if plan.rejections:
            await conn.executemany(_REJECTED, [pg_rejection_row(e) for e in plan.rejections])
        if plan.health:
            await conn.executemany(_HISTORY, [pg_history_row(e) for e in plan.health])
        return written

    async def _write_infra(self, conn: asyncpg.Connection, events: Sequence[Event]) -> None:
        """Fold the batch's infrastructure events over the components they touch."""
        if not events:
            return
        rows = await conn.fetch(f"SELECT {', '.join(INFRA_COLUMNS)} FROM infra_status FOR UPDATE")
        config = await conn.fetchrow("SELECT digest, service_dependencies FROM infra_config")
        state = InfraState({r["component"]: infra_from_pg(r) for r in rows})
        if config is not None:
            state.digest = config["digest"]
            state.service_dependencies = from_json(config["service_dependencies"])
        changed_names, gone = fold_infra(state, events)
        if gone:
            await conn.execute("DELETE FROM infra_status WHERE component = ANY($1::text[])", gone)
        changed = [pg_infra_row(state.components[c]) for c in changed_names]
        if changed:
            await conn.executemany(_INFRA, changed)
        history = [pg_infra_history_row(e) for e in events if isinstance(e, InfraStatusChanged)]
        if history:
            await conn.executemany(_INFRA_HISTORY, history)
        if any(isinstance(e, InfraConfigLoaded) for e in events):
            await conn.execute(_INFRA_CONFIG, *pg_infra_config_row(state))
        checks = [(e.event_id, e.component, e.status, e.response_time_ms, e.error, ts(e.ts))
                  for e in events if isinstance(e, InfraChecked)]  # fmt: skip
        if checks:
            await conn.executemany(_INFRA_CHECK, checks)
            await self._prune_journal(conn)

    async def _write_alerts(self, conn: asyncpg.Connection, events: Sequence[Event]) -> None:
        """Fold the batch's alert events over the rows they touch (``alert_view.keys_of``:
        the open episodes of their alerts, the episodes, silences and notifications they
        name); write the rows that changed."""
        if not events:
            return
        view = await self._read_alerts(conn, keys_of(events))
        episodes = {ep.id: pg_alert_row(ep) for ep in view.episodes.values()}
        silences = {s.id: pg_silence_row(s) for s in view.silences.values()}
        notifications = {n.id: pg_notification_row(n) for n in view.notifications.values()}
        for e in events:
            view.apply(e)
        rows = [r for ep in view.episodes.values()
                if (r := pg_alert_row(ep)) != episodes.get(ep.id)]  # fmt: skip
        if rows:
            # Closed episodes first: an alert's new episode may only open once the row of
            # the one it supersedes says it is closed (the unique index ``alerts_open``).
            state = ALERT_COLUMNS.index("state")
            rows.sort(key=lambda r: r[state] != RESOLVED)
            await conn.executemany(_ALERT, rows)
        rows = [r for s in view.silences.values() if (r := pg_silence_row(s)) != silences.get(s.id)]
        if rows:
            await conn.executemany(_SILENCE, rows)
        rows = [r for n in view.notifications.values()
                if (r := pg_notification_row(n)) != notifications.get(n.id)]  # fmt: skip
        if rows:
            await conn.executemany(_NOTIFICATION, rows)
        if view.config is not None:
            await conn.execute(_ALERT_CONFIG, *pg_alert_config_row(view.config))

    @staticmethod
    async def _read_alerts(conn: asyncpg.Connection, keys: AlertKeys) -> AlertView:
        """The rows ``keys`` names, locked, as an ``AlertView`` (empty: nothing to read)."""
        if not keys:
            return AlertView()
        episodes = await conn.fetch(
            f"SELECT {', '.join(ALERT_COLUMNS)} FROM alerts WHERE id = ANY($2::text[])"
            f" OR (fingerprint = ANY($1::text[]) AND state <> '{RESOLVED}') FOR UPDATE",
            sorted(keys.fingerprints), sorted(keys.episodes),
        )  # fmt: skip
        silences = await conn.fetch(
            f"SELECT {', '.join(SILENCE_COLUMNS)} FROM alert_silences"
            " WHERE silence_id = ANY($1::text[]) FOR UPDATE", sorted(keys.silences),
        )  # fmt: skip
        notifications = await conn.fetch(
            f"SELECT {', '.join(NOTIFICATION_COLUMNS)} FROM alert_notifications"
            " WHERE notification_id = ANY($1::text[]) FOR UPDATE", sorted(keys.notifications),
        )  # fmt: skip
        return AlertView.of(map(alert_from_pg, episodes), map(silence_from_pg, silences),
                            map(notification_from_pg, notifications))  # fmt: skip

    async def _prune_journal(self, conn: asyncpg.Connection) -> None:
        """Keep ``journal_days`` of raw check results (checked at most once a minute)."""
        now = self._clock()
        if now - self._pruned_at < 60:
            return
        self._pruned_at = now
        await conn.execute(f"DELETE FROM {JOURNAL} WHERE ts < $1",
                           ts(now) - timedelta(days=self._journal_days))  # fmt: skip

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
        self._cache.clear()
        async with self._pool.acquire() as conn:
            # One rebuild at a time (``hub replay`` and a projector healing its view
            # share the shadow tables); the lock goes with the session if it dies.
            await conn.execute("SELECT pg_advisory_lock($1)", _REBUILD_LOCK_ID)
            try:
                await self._rebuild(conn, suffix, view, positions)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _REBUILD_LOCK_ID)
        self._floor = dict(positions)

    async def _rebuild(
        self, conn: asyncpg.Connection, suffix: str, view: ViewState, positions: Positions
    ) -> None:
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
        infra = view.registry.infra
        infra_tables: tuple[tuple[str, tuple[str, ...], list[tuple[Any, ...]]], ...] = (
            ("infra_status", INFRA_COLUMNS,
             [pg_infra_row(c) for c in infra.components.values()]),
            ("infra_history", INFRA_HISTORY_COLUMNS,
             [pg_infra_history_row(e) for e in view.infra_history.values()]),
            ("infra_config", INFRA_CONFIG_COLUMNS,
             [pg_infra_config_row(infra)] if infra.digest else []),
        )  # fmt: skip
        alerts = view.alerts
        alert_tables: tuple[tuple[str, tuple[str, ...], list[tuple[Any, ...]]], ...] = (
            ("alerts", ALERT_COLUMNS, [pg_alert_row(ep) for ep in alerts.episodes.values()]),
            ("alert_notifications", NOTIFICATION_COLUMNS,
             [pg_notification_row(n) for n in alerts.notifications.values()]),
            ("alert_silences", SILENCE_COLUMNS,
             [pg_silence_row(s) for s in alerts.silences.values()]),
            ("alert_config", ALERT_CONFIG_COLUMNS,
             [pg_alert_config_row(alerts.config)] if alerts.config else []),
        )  # fmt: skip
        for table, columns, records in infra_tables + alert_tables:
            await conn.copy_records_to_table(f"{table}{suffix}", records=records,
                                             columns=columns)  # fmt: skip
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
            await conn.executemany(_CHECKPOINT, [(self.name, p, n) for p, n in positions.items()])
        for table in TABLES:
            await conn.execute(f"DROP TABLE {table}{suffix}")
