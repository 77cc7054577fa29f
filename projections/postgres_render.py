"""How the fold looks in the PostgreSQL view (pure): the one rendering of each row.

The projection writes these rows, rebuild copies them, and ``hub verify`` compares
the tables with ``expected_pg`` of the fold, line by line (``canonical_pg``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from events.model import (
    Event,
    FlappingEnded,
    FlappingStarted,
    InfraStatusChanged,
    InputRejected,
    InstanceExpired,
    InstanceHealthChanged,
    SelfPreservationEnded,
    SelfPreservationStarted,
)
from handlers.infra import InfraComponent, InfraState
from handlers.registry import CRITICAL, EXPIRED, Instance
from projections.alert_view import AlertConfig, Episode, Notification, Silence
from projections.canonical import (
    CHECK_FIELDS,
    HEARTBEAT_FIELDS,
    Rendering,
    component_subject,
    from_json,
    instance_subject,
    to_json,
)
from projections.fold import ViewState, last_check


def ts(seconds: float) -> datetime:
    """Event time as PostgreSQL stores it (microsecond resolution)."""
    return datetime.fromtimestamp(seconds, UTC)


def row_id(tenant: str, service: str, instance: str) -> str:
    """The primary key of an instance's ``service_registry`` row (``tenant/service/instance``,
    as verify names the instance: ``canonical.instance_subject``)."""
    return instance_subject(tenant, service, instance)


REGISTRY_COLUMNS = (
    "id", "tenant_id", "service_name", "instance_id", "host", "port", "protocol",
    "health_endpoint", "version", "metadata", "status", "registered_at", "last_seen",
    "transport_preferences", "contract_validated", "heartbeat_interval_s", "depends_on", "load",
    "ttl_s", "expire_after_s", "status_since", "flapping", "reported_status", "checks",
)  # fmt: skip
REJECTION_COLUMNS = (
    "event_id", "tenant_id", "ingress_seq", "subject", "reason_code", "reason", "excerpt", "ts",
)  # fmt: skip
HISTORY_COLUMNS = (
    "event_id", "tenant_id", "service_name", "instance_id", "kind", "previous", "status",
    "reason", "ts", "detail",
)  # fmt: skip


def pg_registry_row(inst: Instance) -> tuple[Any, ...]:
    """One ``service_registry`` row, in REGISTRY_COLUMNS order (jsonb as JSON text)."""
    return (
        row_id(inst.tenant, inst.service_name, inst.instance_id), inst.tenant,
        inst.service_name, inst.instance_id, inst.host, inst.port, inst.protocol,
        inst.health_endpoint, inst.version, to_json(inst.metadata),
        inst.status, ts(inst.registered_at), ts(inst.last_seen),
        to_json(inst.transport_preferences), False, inst.heartbeat_interval_s,
        to_json(inst.depends_on), inst.load, inst.ttl_s, inst.expire_after_s,
        ts(inst.status_since), inst.flapping, inst.reported,
        to_json(inst.checks),
    )  # fmt: skip


def pg_heartbeat_row(inst: Instance) -> tuple[Any, ...]:
    """The row's id and its HEARTBEAT_FIELDS (the columns a heartbeat sets), as
    pg_registry_row renders them."""
    return (row_id(inst.tenant, inst.service_name, inst.instance_id), ts(inst.last_seen),
            inst.load, inst.reported, to_json(inst.checks))  # fmt: skip


def instance_from_pg(row: Mapping[str, Any]) -> Instance:
    """The fold's Instance back from a ``service_registry`` row."""
    return Instance(
        tenant=row["tenant_id"], service_name=row["service_name"],
        instance_id=row["instance_id"], host=row["host"], port=row["port"],
        protocol=row["protocol"], health_endpoint=row["health_endpoint"],
        version=row["version"], metadata=from_json(row["metadata"]),
        transport_preferences=from_json(row["transport_preferences"]),
        heartbeat_interval_s=row["heartbeat_interval_s"],
        depends_on=from_json(row["depends_on"]), status=row["status"],
        registered_at=row["registered_at"].timestamp(), last_seen=row["last_seen"].timestamp(),
        load=row["load"], ttl_s=row["ttl_s"], expire_after_s=row["expire_after_s"],
        status_since=row["status_since"].timestamp(), flapping=row["flapping"],
        reported=row["reported_status"], checks=from_json(row["checks"]),
    )  # fmt: skip


def pg_rejection_row(e: InputRejected) -> tuple[Any, ...]:
    return (e.event_id, e.tenant, e.ingress_seq, e.subject, e.reason_code, e.reason,
            e.excerpt, ts(e.ts))  # fmt: skip


def pg_history_row(e: Event) -> tuple[Any, ...]:
    """One ``health_history`` row, in HISTORY_COLUMNS order (``detail`` as JSON text)."""
    service = getattr(e, "service_name", "")
    instance = getattr(e, "instance_id", "")
    detail: dict[str, Any] = {}
    match e:
        case InstanceHealthChanged():
            kind, previous, status, reason = "health_changed", e.previous, e.status, e.reason
            detail = {"last_seen": e.last_seen}
        case InstanceExpired():
            kind, previous, status, reason = "expired", CRITICAL, EXPIRED, e.reason
            detail = {"last_seen": e.last_seen, "critical_since": e.critical_since}
        case FlappingStarted():
            kind, previous, status = "flapping_started", "", e.status
            reason = f"{e.changes} health changes within {e.window_s:g} s"
            detail = {"changes": e.changes, "window_s": e.window_s}
        case FlappingEnded():
            kind, previous, status = "flapping_ended", e.previous, e.status
            reason = f"stable for {e.quiet_s:.1f} s"
            detail = {"quiet_s": e.quiet_s}
        case SelfPreservationStarted():
            kind, previous, status = "self_preservation_started", "", "preserving"
            reason = f"{e.critical} of {e.live} instances critical at once"
            detail = {"critical": e.critical, "live": e.live, "share": e.share,
                      "until": e.until, "at_risk": e.at_risk}  # fmt: skip
        case SelfPreservationEnded():
            kind, previous, status, reason = "self_preservation_ended", "preserving", "", e.reason
            detail = {"critical": e.critical, "live": e.live}
        case _:
            raise TypeError(f"{type(e).__name__} is not a health event")
    return (e.event_id, e.tenant, service, instance, kind, previous, status, reason, ts(e.ts),
            to_json(detail))  # fmt: skip


INFRA_COLUMNS = (
    "component", "status", "status_since", "last_result", "checked_at", "response_time_ms",
    "error", "metadata", "consecutive_failures", "config",
)  # fmt: skip
INFRA_HISTORY_COLUMNS = (
    "event_id", "component", "previous", "status", "reason", "consecutive_failures", "ts",
)  # fmt: skip
INFRA_CONFIG_COLUMNS = ("id", "digest", "service_dependencies")


def pg_infra_row(c: InfraComponent) -> tuple[Any, ...]:
    """One ``infra_status`` row, in INFRA_COLUMNS order."""
    last = c.last_check
    return (
        c.name, c.status, ts(c.status_since), last.status if last else None,
        ts(last.ts) if last else None, last.response_time_ms if last else None,
        last.error if last else "", to_json(last.metadata if last else {}),
        c.consecutive_failures, to_json(c.config),
    )  # fmt: skip


def infra_from_pg(row: Mapping[str, Any]) -> InfraComponent:
    checked = row["checked_at"].timestamp() if row["checked_at"] else 0.0
    fields = {**row, "metadata": from_json(row["metadata"]), "checked_at": checked}
    return InfraComponent(row["component"], from_json(row["config"]), status=row["status"],
                          status_since=row["status_since"].timestamp(),
                          last_check=last_check(row["component"], fields))  # fmt: skip


def pg_infra_history_row(e: InfraStatusChanged) -> tuple[Any, ...]:
    return (e.event_id, e.component, e.previous, e.status, e.reason, e.consecutive_failures,
            ts(e.ts))  # fmt: skip


def pg_infra_config_row(infra: InfraState) -> tuple[Any, ...]:
    return (1, infra.digest, to_json(infra.service_dependencies))


# --- alerts (``projections.alert_view``) ---------------------------------------------------

ALERT_COLUMNS = (
    "id", "fingerprint", "tenant_id", "rule", "severity", "state", "labels", "annotations",
    "value", "active_since", "fired_at", "resolved_at", "resolve_reason", "inhibited_by",
    "inhibited_by_rule", "inhibited_reason", "acknowledged_by", "acknowledged_at",
    "acknowledged_comment",
)  # fmt: skip
NOTIFICATION_COLUMNS = (
    "notification_id", "tenant_id", "receiver", "group_key", "group_labels",
    "firing_fingerprints", "resolved_fingerprints", "epoch", "severity", "state", "due_at",
    "sent_at", "attempts", "last_error", "next_attempt_at", "sent_detail", "out_of_band",
)  # fmt: skip
SILENCE_COLUMNS = (
    "silence_id", "tenant_id", "matchers", "starts_at", "ends_at", "created_by", "comment",
    "created_at", "expired_at", "expired_by", "expire_reason",
)  # fmt: skip
ALERT_CONFIG_COLUMNS = ("id", "digest", "source", "loaded_at")


def _ts_or_none(seconds: float | None) -> datetime | None:
    return None if seconds is None else ts(seconds)


def _seconds(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def pg_alert_row(ep: Episode) -> tuple[Any, ...]:
    """One ``alerts`` row (an episode), in ALERT_COLUMNS order."""
    return (
        ep.id, ep.fingerprint, ep.tenant, ep.rule, ep.severity, ep.state, to_json(ep.labels),
        to_json(ep.annotations), ep.value, ts(ep.active_since), _ts_or_none(ep.fired_at),
        _ts_or_none(ep.resolved_at), ep.resolve_reason, ep.inhibited_by, ep.inhibited_by_rule,
        ep.inhibited_reason, ep.acknowledged_by, _ts_or_none(ep.acknowledged_at),
        ep.acknowledged_comment,
    )  # fmt: skip


def alert_from_pg(row: Mapping[str, Any]) -> Episode:
    return Episode(
        row["id"], row["fingerprint"], row["tenant_id"], row["rule"], row["severity"],
        row["state"], from_json(row["labels"]), from_json(row["annotations"]),
        row["active_since"].timestamp(), value=row["value"],
        fired_at=_seconds(row["fired_at"]), resolved_at=_seconds(row["resolved_at"]),
        resolve_reason=row["resolve_reason"], inhibited_by=row["inhibited_by"],
        inhibited_by_rule=row["inhibited_by_rule"], inhibited_reason=row["inhibited_reason"],
        acknowledged_by=row["acknowledged_by"],
        acknowledged_at=_seconds(row["acknowledged_at"]),
        acknowledged_comment=row["acknowledged_comment"],
    )  # fmt: skip


def pg_notification_row(n: Notification) -> tuple[Any, ...]:
    """One ``alert_notifications`` row, in NOTIFICATION_COLUMNS order."""
    return (
        n.id, n.tenant, n.receiver, n.group_key, to_json(n.group_labels), to_json(n.firing),
        to_json(n.resolved), n.epoch, n.severity, n.state, ts(n.due_at), _ts_or_none(n.sent_at),
        n.attempts, n.last_error, _ts_or_none(n.next_attempt_at), n.detail, n.out_of_band,
    )  # fmt: skip


def notification_from_pg(row: Mapping[str, Any]) -> Notification:
    return Notification(
        row["notification_id"], row["tenant_id"], row["receiver"], row["group_key"],
        from_json(row["group_labels"]), from_json(row["firing_fingerprints"]),
        from_json(row["resolved_fingerprints"]), row["epoch"], row["severity"],
        row["due_at"].timestamp(), state=row["state"], sent_at=_seconds(row["sent_at"]),
        attempts=row["attempts"], last_error=row["last_error"],
        next_attempt_at=_seconds(row["next_attempt_at"]), detail=row["sent_detail"],
        out_of_band=row["out_of_band"],
    )  # fmt: skip


def pg_silence_row(s: Silence) -> tuple[Any, ...]:
    """One ``alert_silences`` row, in SILENCE_COLUMNS order."""
    return (s.id, s.tenant, to_json(s.matchers), ts(s.starts_at), ts(s.ends_at), s.created_by,
            s.comment, ts(s.created_at), _ts_or_none(s.expired_at), s.expired_by,
            s.expire_reason)  # fmt: skip


def silence_from_pg(row: Mapping[str, Any]) -> Silence:
    return Silence(
        row["silence_id"], row["tenant_id"], from_json(row["matchers"]),
        row["starts_at"].timestamp(), row["ends_at"].timestamp(), row["created_by"],
        row["comment"], row["created_at"].timestamp(), expired_at=_seconds(row["expired_at"]),
        expired_by=row["expired_by"], expire_reason=row["expire_reason"],
    )  # fmt: skip


def pg_alert_config_row(config: AlertConfig) -> tuple[Any, ...]:
    return (1, config.digest, config.source, ts(config.loaded_at))


JSONB_COLUMNS = frozenset({"metadata", "transport_preferences", "depends_on", "checks", "detail",
                           "config", "service_dependencies", "labels", "annotations",
                           "group_labels", "firing_fingerprints", "resolved_fingerprints",
                           "matchers"})  # fmt: skip


def _canonical_numbers(value: Any) -> Any:
    """JSON numbers as PostgreSQL's jsonb gives them back: a float with an integral
    value comes back as an integer (1e16 -> 10000000000000000, -0.0 -> 0), so such
    floats render as integers on both sides; strings stay strings."""
    if isinstance(value, float) and value.is_integer():
        # jsonb stores the decimal digits JSON carried (Python's shortest repr),
        # not the float's exact binary value: -6.197572189500859e16 comes back as
        # -61975721895008590, not int(value) = -61975721895008592.
        return int(Decimal(repr(value)))
    if isinstance(value, dict):
        return {k: _canonical_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical_numbers(v) for v in value]
    return value


def canonical_pg(table: str, columns: Iterable[str], row: Iterable[Any]) -> str:
    """A row as one canonical line: jsonb columns parsed, times in ISO 8601 UTC."""
    out = []
    for column, value in zip(columns, row, strict=True):
        if isinstance(value, datetime):
            out.append(value.astimezone(UTC).isoformat())
        elif column in JSONB_COLUMNS and isinstance(value, str):
            out.append(_canonical_numbers(from_json(value)))
        else:
            out.append(value)
    return table + " " + to_json(out)


def expected_pg(view: ViewState) -> dict[str, str]:
    """The rows the PostgreSQL view must hold: ``{table/primary key: canonical line}``."""
    rows: dict[str, str] = {}
    for inst in view.registry.instances.values():
        row = pg_registry_row(inst)
        rows[f"service_registry/{row[0]}"] = canonical_pg("service_registry", REGISTRY_COLUMNS, row)
    for e in view.rejections.values():
        rows[f"input_rejections/{e.event_id}"] = canonical_pg(
            "input_rejections", REJECTION_COLUMNS, pg_rejection_row(e)
        )
    for h in view.history.values():
        rows[f"health_history/{h.event_id}"] = canonical_pg(
            "health_history", HISTORY_COLUMNS, pg_history_row(h)
        )
    infra = view.registry.infra
    for c in infra.components.values():
        rows[f"infra_status/{c.name}"] = canonical_pg("infra_status", INFRA_COLUMNS,
                                                      pg_infra_row(c))  # fmt: skip
    for i in view.infra_history.values():
        rows[f"infra_history/{i.event_id}"] = canonical_pg(
            "infra_history", INFRA_HISTORY_COLUMNS, pg_infra_history_row(i)
        )
    if infra.digest:
        rows["infra_config/1"] = canonical_pg("infra_config", INFRA_CONFIG_COLUMNS,
                                              pg_infra_config_row(infra))  # fmt: skip
    alerts = view.alerts
    for ep in alerts.episodes.values():
        rows[f"alerts/{ep.id}"] = canonical_pg("alerts", ALERT_COLUMNS, pg_alert_row(ep))
    for n in alerts.notifications.values():
        rows[f"alert_notifications/{n.id}"] = canonical_pg(
            "alert_notifications", NOTIFICATION_COLUMNS, pg_notification_row(n)
        )
    for s in alerts.silences.values():
        rows[f"alert_silences/{s.id}"] = canonical_pg("alert_silences", SILENCE_COLUMNS,
                                                      pg_silence_row(s))  # fmt: skip
    if alerts.config is not None:
        rows["alert_config/1"] = canonical_pg("alert_config", ALERT_CONFIG_COLUMNS,
                                              pg_alert_config_row(alerts.config))  # fmt: skip
    return rows


# --- verify: volatile columns ------------------------------------------------------------

_HB_INDEXES = [REGISTRY_COLUMNS.index(c) for c in HEARTBEAT_FIELDS]
_CHECK_INDEXES = [INFRA_COLUMNS.index(c) for c in CHECK_FIELDS]
_REGISTRY = "service_registry/"
_INFRA = "infra_status/"


def volatile_of(key: str) -> str | None:
    """What a row is about when part of it is volatile: the instance of a registry row
    (its heartbeat columns), the component of an ``infra_status`` row (its last check)."""
    if key.startswith(_REGISTRY):
        return key[len(_REGISTRY) :]  # the row id is the instance's subject
    if key.startswith(_INFRA):
        return component_subject(key[len(_INFRA) :])
    return None


def without_volatile(line: str) -> str:
    """A canonical line with its volatile columns (heartbeat, last check) set to null."""
    head, _, body = line.partition(" ")
    if head not in ("service_registry", "infra_status"):
        return line
    values = from_json(body)
    for i in _HB_INDEXES if head == "service_registry" else _CHECK_INDEXES:
        values[i] = None
    return head + " " + to_json(values)


POSTGRES_RENDERING = Rendering(expected_pg, volatile_of, without_volatile)
