"""PostgreSQL schema of the views (registry, infrastructure, alerts), as ordered, idempotent
migrations."""

from __future__ import annotations

import asyncpg

# Append only: a migration, once released, is never edited.
MIGRATIONS: list[str] = [
    # 1: the registry (the seed's columns, plus instance_id and the lease figures),
    #    checkpoints and rejected input.
    """
    CREATE TABLE service_registry (
        id                    text PRIMARY KEY,        -- tenant/service/instance
        tenant_id             text NOT NULL,
        service_name          text NOT NULL,
        instance_id           text NOT NULL,
        host                  text NOT NULL,
        port                  integer NOT NULL,
        protocol              text NOT NULL,
        health_endpoint       text NOT NULL,
        version               text NOT NULL,
        metadata              jsonb NOT NULL,
        status                text NOT NULL,
        registered_at         timestamptz NOT NULL,
        last_seen             timestamptz NOT NULL,
        transport_preferences jsonb NOT NULL,
        contract_validated    boolean NOT NULL DEFAULT false,
        heartbeat_interval_s  double precision NOT NULL,
        depends_on            jsonb NOT NULL,
        load                  double precision,
        UNIQUE (tenant_id, service_name, instance_id)
    );
    CREATE INDEX service_registry_tenant_service ON service_registry (tenant_id, service_name);
    CREATE TABLE projection_checkpoints (
        projection  text NOT NULL,
        partition   integer NOT NULL,
        position    bigint NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (projection, partition)
    );
    CREATE TABLE input_rejections (
        event_id     text PRIMARY KEY,
        tenant_id    text NOT NULL,
        ingress_seq  bigint NOT NULL,
        subject      text NOT NULL,
        reason_code  text NOT NULL,
        reason       text NOT NULL,
        excerpt      text NOT NULL,
        ts           timestamptz NOT NULL
    );
    CREATE INDEX input_rejections_tenant ON input_rejections (tenant_id, ts);
    """,
    # 2: leases and health (issue: liveness): the lease figures, health details and
    #    the health history (every transition with its reason and time).
    """
    ALTER TABLE service_registry
        ADD COLUMN ttl_s           double precision NOT NULL DEFAULT 30,
        ADD COLUMN expire_after_s  double precision NOT NULL DEFAULT 60,
        ADD COLUMN status_since    timestamptz NOT NULL DEFAULT now(),
        ADD COLUMN flapping        boolean NOT NULL DEFAULT false,
        ADD COLUMN reported_status text NOT NULL DEFAULT 'healthy',
        ADD COLUMN checks          jsonb NOT NULL DEFAULT '{}';
    CREATE INDEX service_registry_status ON service_registry (tenant_id, status);
    CREATE TABLE health_history (
        event_id      text PRIMARY KEY,
        tenant_id     text NOT NULL,
        service_name  text NOT NULL,   -- '' for tenant-wide events (self-preservation)
        instance_id   text NOT NULL,
        kind          text NOT NULL,   -- health_changed, expired, flapping_*, self_preservation_*
        previous      text NOT NULL,
        status        text NOT NULL,
        reason        text NOT NULL,
        ts            timestamptz NOT NULL,
        detail        jsonb NOT NULL
    );
    CREATE INDEX health_history_instance
        ON health_history (tenant_id, service_name, instance_id, ts);
    CREATE INDEX health_history_ts ON health_history (tenant_id, ts);
    """,
    # 3: infrastructure (issue: infrastructure monitor): current status per component,
    #    its transitions, the configuration digest, and a journal of raw check results
    #    (kept for HUB_INFRA_HISTORY_DAYS; not rebuilt by replay: the log keeps only
    #    each component's latest result).
    """
    CREATE TABLE infra_status (
        component            text PRIMARY KEY,
        status               text NOT NULL,
        status_since         timestamptz NOT NULL,
        last_result          text,
        checked_at           timestamptz,
        response_time_ms     double precision,
        error                text NOT NULL,
        metadata             jsonb NOT NULL,
        consecutive_failures integer NOT NULL,
        config               jsonb NOT NULL
    );
    CREATE TABLE infra_history (
        event_id             text PRIMARY KEY,
        component            text NOT NULL,
        previous             text NOT NULL,
        status               text NOT NULL,
        reason               text NOT NULL,
        consecutive_failures integer NOT NULL,
        ts                   timestamptz NOT NULL
    );
    CREATE INDEX infra_history_component ON infra_history (component, ts);
    CREATE TABLE infra_config (
        id                   integer PRIMARY KEY,
        digest               text NOT NULL,
        service_dependencies jsonb NOT NULL
    );
    CREATE TABLE infra_checks (
        event_id             text PRIMARY KEY,
        component            text NOT NULL,
        status               text NOT NULL,
        response_time_ms     double precision NOT NULL,
        error                text NOT NULL,
        ts                   timestamptz NOT NULL
    );
    CREATE INDEX infra_checks_component ON infra_checks (component, ts);
    CREATE INDEX infra_checks_ts ON infra_checks (ts);
    """,
    # 4: every heartbeat updates its instance's row, and no indexed column: with room
    #    left on each page the update stays on the page (a HOT update, no index entry),
    #    instead of writing the row elsewhere plus an entry in each of three indexes.
    """
    ALTER TABLE service_registry SET (fillfactor = 50);
    """,
    # 5: alerts (issue: alerting): every episode of every alert (resolved ones stay),
    #    the notifications (the outbox, as sent or failed), the silences, and the
    #    alerting configuration in force. An alert has one open episode at most.
    """
    CREATE TABLE alerts (
        id                   text PRIMARY KEY,   -- fingerprint@active_since (microseconds)
        fingerprint          text NOT NULL,
        tenant_id            text NOT NULL,
        rule                 text NOT NULL,
        severity             text NOT NULL,
        state                text NOT NULL,      -- pending, firing, resolved
        labels               jsonb NOT NULL,
        annotations          jsonb NOT NULL,
        value                double precision,
        active_since         timestamptz NOT NULL,
        fired_at             timestamptz,
        resolved_at          timestamptz,
        resolve_reason       text NOT NULL,
        inhibited_by         text,               -- the fingerprint of the muting alert
        inhibited_by_rule    text NOT NULL,
        inhibited_reason     text NOT NULL,
        acknowledged_by      text,
        acknowledged_at      timestamptz,
        acknowledged_comment text NOT NULL
    );
    CREATE UNIQUE INDEX alerts_open ON alerts (fingerprint) WHERE state <> 'resolved';
    CREATE INDEX alerts_fingerprint ON alerts (fingerprint, active_since);
    CREATE INDEX alerts_tenant ON alerts (tenant_id, active_since DESC);
    CREATE TABLE alert_notifications (
        notification_id       text PRIMARY KEY,
        tenant_id             text NOT NULL,
        receiver              text NOT NULL,
        group_key             text NOT NULL,
        group_labels          jsonb NOT NULL,
        firing_fingerprints   jsonb NOT NULL,
        resolved_fingerprints jsonb NOT NULL,
        epoch                 bigint NOT NULL,
        severity              text NOT NULL,
        state                 text NOT NULL,     -- due, sent, retrying, failed
        due_at                timestamptz NOT NULL,
        sent_at               timestamptz,
        attempts              integer NOT NULL,
        last_error            text NOT NULL,
        next_attempt_at       timestamptz,
        sent_detail           text NOT NULL,
        out_of_band           boolean NOT NULL
    );
    CREATE INDEX alert_notifications_tenant ON alert_notifications (tenant_id, due_at DESC);
    CREATE TABLE alert_silences (
        silence_id     text PRIMARY KEY,
        tenant_id      text NOT NULL,
        matchers       jsonb NOT NULL,
        starts_at      timestamptz NOT NULL,
        ends_at        timestamptz NOT NULL,
        created_by     text NOT NULL,
        comment        text NOT NULL,
        created_at     timestamptz NOT NULL,
        expired_at     timestamptz,
        expired_by     text NOT NULL,
        expire_reason  text NOT NULL
    );
    CREATE TABLE alert_config (
        id         integer PRIMARY KEY,
        digest     text NOT NULL,
        source     text NOT NULL,
        loaded_at  timestamptz NOT NULL
    );
    """,
]

_LOCK_ID = 0x48554253  # "HUBS": one migrator at a time across hub instances


async def migrate(conn: asyncpg.Connection) -> int:
    """Apply pending migrations in order; returns the schema version reached."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        for version, sql in enumerate(MIGRATIONS, start=1):
            if version > current:
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        return len(MIGRATIONS)
