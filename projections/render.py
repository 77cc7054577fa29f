"""How the fold of the log looks in each view (pure): the one rendering of a row or key.

The projections write exactly these renderings, and ``hub verify`` compares a
view with the rendering of the pure fold, so "the view equals the fold" is a
byte-for-byte statement.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from events.model import (
    HEALTH_EVENTS,
    Event,
    FlappingEnded,
    FlappingStarted,
    InfraChecked,
    InfraStatusChanged,
    InputRejected,
    InstanceExpired,
    InstanceHealthChanged,
    SelfPreservationEnded,
    SelfPreservationStarted,
)
from events.names import INFRA_TENANT
from handlers.infra import InfraComponent, InfraState
from handlers.ledger import SeqLedger
from handlers.registry import EXPIRED, HEALTHY, Instance, RegistryState, evolve
from projections import keys

_json = msgspec.json.Encoder(order="sorted")
from_json = msgspec.json.decode


def to_json(value: Any) -> str:
    """The one JSON rendering of a structured field: compact, object keys sorted."""
    return _json.encode(value).decode()


def ts(seconds: float) -> datetime:
    """Event time as PostgreSQL stores it (microsecond resolution)."""
    return datetime.fromtimestamp(seconds, UTC)


def num(value: float) -> str:
    """The one rendering of a number in the Redis view."""
    return repr(float(value))


def row_id(tenant: str, service: str, instance: str) -> str:
    return f"{tenant}/{service}/{instance}"


# --- the fold the views are checked against --------------------------------------


class _Unrecorded(SeqLedger):
    """No view shows which ingress sequences were recorded (only the ingest loop needs
    that), so a fold for the views skips the bookkeeping: on a partitioned log the
    sequences come out of order, and tracking them was a tenth of replay's fold."""

    def add(self, seq: int) -> None:
        return None


def _view_registry() -> RegistryState:
    return RegistryState(ingress=_Unrecorded())


@dataclass
class ViewState:
    """The registry fold plus what only the views keep (every rejection)."""

    registry: RegistryState = field(default_factory=_view_registry)
    rejections: dict[str, InputRejected] = field(default_factory=dict)
    history: dict[str, Event] = field(default_factory=dict)
    infra_history: dict[str, InfraStatusChanged] = field(default_factory=dict)

    def apply(self, event: Event) -> None:
        evolve(self.registry, event)
        if isinstance(event, InputRejected):
            self.rejections[event.event_id] = event
        elif isinstance(event, HEALTH_EVENTS):
            self.history[event.event_id] = event
        elif isinstance(event, InfraStatusChanged):
            self.infra_history[event.event_id] = event


def fold_view(events: Iterable[Event]) -> ViewState:
    view = ViewState()
    for e in events:
        view.apply(e)
    return view


# --- PostgreSQL --------------------------------------------------------------------

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


# The service_registry columns a heartbeat sets; a batch that only brings heartbeats
# for an instance changes no other column.
PG_HEARTBEAT_COLUMNS = ("last_seen", "load", "reported_status", "checks")


def pg_heartbeat_row(inst: Instance) -> tuple[Any, ...]:
    """The row's id and its PG_HEARTBEAT_COLUMNS, as pg_registry_row renders them."""
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
            kind, previous, status, reason = "expired", "critical", EXPIRED, e.reason
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


def _last_check(name: str, fields: Mapping[str, Any]) -> InfraChecked | None:
    if fields["last_result"] is None:
        return None
    return InfraChecked(
        event_id="", tenant=INFRA_TENANT, ts=fields["checked_at"], component=name,
        status=fields["last_result"], response_time_ms=fields["response_time_ms"],
        error=fields["error"], metadata=fields["metadata"],
        consecutive_failures=fields["consecutive_failures"],
    )  # fmt: skip


def infra_from_pg(row: Mapping[str, Any]) -> InfraComponent:
    checked = row["checked_at"].timestamp() if row["checked_at"] else 0.0
    fields = {**row, "metadata": from_json(row["metadata"]), "checked_at": checked}
    return InfraComponent(row["component"], from_json(row["config"]), status=row["status"],
                          status_since=row["status_since"].timestamp(),
                          last_check=_last_check(row["component"], fields))  # fmt: skip


def pg_infra_history_row(e: InfraStatusChanged) -> tuple[Any, ...]:
    return (e.event_id, e.component, e.previous, e.status, e.reason, e.consecutive_failures,
            ts(e.ts))  # fmt: skip


def pg_infra_config_row(infra: InfraState) -> tuple[Any, ...]:
    return (1, infra.digest, to_json(infra.service_dependencies))


JSONB_COLUMNS = frozenset({"metadata", "transport_preferences", "depends_on", "checks", "detail",
                           "config", "service_dependencies"})  # fmt: skip


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
    return rows


# --- Redis ---------------------------------------------------------------------------


def iso(seconds: str | None) -> str | None:
    """A time of the Redis view (``num``) as the query answers show it."""
    if seconds is None:
        return None
    return _iso(seconds)


@functools.lru_cache(maxsize=65_536)
def _iso(seconds: str) -> str:
    # Cached: most of an instance's times (registered_at, status_since) do not change
    # from one query to the next, and formatting them was most of an instance's cost.
    return datetime.fromtimestamp(float(seconds), UTC).isoformat().replace("+00:00", "Z")


_doc = msgspec.json.Encoder()


def instance_doc(h: Mapping[str, str]) -> str:
    """The ``doc`` field of an instance hash: the fields that change only when the
    instance registers again, rendered from the hash's own fields as the query answers
    show them (one JSON object), so that a page is answered without reading and
    rendering them field by field."""
    return _doc.encode({
        "instance_id": h["instance_id"],
        "service_name": h["service_name"],
        "host": h["host"],
        "port": int(h["port"]),
        "protocol": h["protocol"],
        "version": h["version"],
        "health_endpoint": h["health_endpoint"],
        "ttl_s": float(h.get("ttl_s", 0.0)),
        "expire_after_s": float(h.get("expire_after_s", 0.0)),
        "metadata": msgspec.Raw(h["metadata"].encode()),
        "transport_preferences": msgspec.Raw(h["transport_preferences"].encode()),
        "depends_on": msgspec.Raw(h["depends_on"].encode()),
        "heartbeat_interval_s": float(h["heartbeat_interval_s"]),
        "registered_at": iso(h.get("registered_at")),
    }).decode()  # fmt: skip


def redis_instance_hash(inst: Instance) -> dict[str, str]:
    h = {
        "service_name": inst.service_name,
        "instance_id": inst.instance_id,
        "host": inst.host,
        "port": str(inst.port),
        "protocol": inst.protocol,
        "version": inst.version,
        "health_endpoint": inst.health_endpoint,
        "metadata": to_json(inst.metadata),
        "transport_preferences": to_json(inst.transport_preferences),
        "heartbeat_interval_s": num(inst.heartbeat_interval_s),
        "depends_on": to_json(inst.depends_on),
        "status": inst.status,
        "registered_at": num(inst.registered_at),
        "ttl_s": num(inst.ttl_s),
        "expire_after_s": num(inst.expire_after_s),
        "status_since": num(inst.status_since),
        "flapping": "1" if inst.flapping else "0",
    }
    h["doc"] = instance_doc(h)
    h.update(redis_heartbeat_fields(inst))
    return h


def redis_heartbeat_fields(inst: Instance) -> dict[str, str]:
    """The fields of the instance hash a heartbeat sets (``load`` absent when None);
    a batch that only brings heartbeats for an instance changes no other field."""
    h = {
        "last_seen": num(inst.last_seen),
        "reported_status": inst.reported,
        "checks": to_json(inst.checks),
    }
    if inst.load is not None:
        h["load"] = num(inst.load)
    return h


def instance_from_redis(tenant: str, h: Mapping[str, str]) -> Instance:
    return Instance(
        tenant=tenant, service_name=h["service_name"], instance_id=h["instance_id"],
        host=h["host"], port=int(h["port"]), protocol=h["protocol"],
        health_endpoint=h["health_endpoint"], version=h["version"],
        metadata=from_json(h["metadata"]),
        transport_preferences=from_json(h["transport_preferences"]),
        heartbeat_interval_s=float(h["heartbeat_interval_s"]),
        depends_on=from_json(h["depends_on"]), status=h["status"],
        registered_at=float(h["registered_at"]), last_seen=float(h["last_seen"]),
        load=float(h["load"]) if "load" in h else None, ttl_s=float(h["ttl_s"]),
        expire_after_s=float(h["expire_after_s"]), status_since=float(h["status_since"]),
        flapping=h["flapping"] == "1", reported=h["reported_status"],
        checks=from_json(h["checks"]),
    )  # fmt: skip


def redis_infra_hash(c: InfraComponent) -> dict[str, str]:
    """``hub:_infra:component:<name>``: status, last check and configuration."""
    h = {"component": c.name, "status": c.status, "status_since": num(c.status_since),
         "config": to_json(c.config)}  # fmt: skip
    last = c.last_check
    if last is not None:
        h |= {"last_result": last.status, "checked_at": num(last.ts),
              "response_time_ms": num(last.response_time_ms), "error": last.error,
              "metadata": to_json(last.metadata),
              "consecutive_failures": str(last.consecutive_failures)}  # fmt: skip
    return h


def infra_from_redis(h: Mapping[str, str]) -> InfraComponent:
    last = None
    if "last_result" in h:
        last = _last_check(h["component"], {
            "last_result": h["last_result"], "checked_at": float(h["checked_at"]),
            "response_time_ms": float(h["response_time_ms"]), "error": h["error"],
            "metadata": from_json(h["metadata"]),
            "consecutive_failures": int(h["consecutive_failures"])})  # fmt: skip
    return InfraComponent(h["component"], from_json(h["config"]), status=h["status"],
                          status_since=float(h["status_since"]), last_check=last)  # fmt: skip


def redis_preservation_hash(since: float, until: float) -> dict[str, str]:
    """``hub:<t>:preservation``: present while the tenant is in self-preservation."""
    return {"since": num(since), "until": num(until)}


def counted(status: str, flapping: bool) -> list[str]:
    """The fields of ``hub:<t>:counts:<service>`` one live instance counts in: its
    status (``status:<status>``), ``flapping``, and ``trusted`` when it is healthy and
    not flapping (what a service's health is judged on)."""
    fields = [f"status:{status}"]
    if flapping:
        fields.append("flapping")
    elif status == HEALTHY:
        fields.append("trusted")
    return fields


# A sorted set as (member, score) pairs, by member.
ZSetValue = tuple[tuple[str, float], ...]
RedisValue = dict[str, str] | frozenset[str] | ZSetValue


def expected_redis(view: ViewState, prefix: str = keys.PREFIX) -> dict[str, RedisValue]:
    """Every key the Redis view must hold (checkpoints aside), with its value."""
    out: dict[str, RedisValue] = {}
    services: dict[str, set[str]] = {}
    members: dict[tuple[str, str], set[str]] = {}
    index: dict[str, list[str]] = {}
    by_status: dict[tuple[str, str], dict[str, int]] = {}
    tenants: set[str] = set()
    for inst in view.registry.instances.values():
        tenants.add(inst.tenant)
        if not inst.live:
            continue
        t, s, i = inst.tenant, inst.service_name, inst.instance_id
        out[keys.instance_key(t, s, i, prefix)] = redis_instance_hash(inst)
        members.setdefault((t, s), set()).add(i)
        services.setdefault(t, set()).add(s)
        index.setdefault(t, []).append(keys.index_member(s, i))
        tally = by_status.setdefault((t, s), {})
        for f in counted(inst.status, inst.flapping):
            tally[f] = tally.get(f, 0) + 1
    for (t, s), ids in members.items():
        out[keys.service_key(t, s, prefix)] = frozenset(ids)
    for t, names in services.items():
        out[keys.services_key(t, prefix)] = frozenset(names)
    for t, listed in index.items():
        out[keys.index_key(t, prefix)] = tuple((m, 0.0) for m in sorted(listed))
    for (t, s), tally in by_status.items():
        out[keys.counts_key(t, s, prefix)] = {f: str(n) for f, n in tally.items()}
    if tenants:
        out[keys.tenants_key(prefix)] = frozenset(tenants)
    stats: dict[str, dict[str, int]] = {}
    for e in view.rejections.values():
        counts = stats.setdefault(e.tenant, {})
        counts["rejected"] = counts.get("rejected", 0) + 1
        code = f"rejected:{e.reason_code}"
        counts[code] = counts.get(code, 0) + 1
    for t, counts in stats.items():
        out[keys.stats_key(t, prefix)] = {k: str(v) for k, v in counts.items()}
    for t, period in view.registry.preservation.items():
        out[keys.preservation_key(t, prefix)] = redis_preservation_hash(period.since, period.until)
    infra = view.registry.infra
    for c in infra.components.values():
        out[keys.component_key(c.name, prefix)] = redis_infra_hash(c)
    if infra.components:
        out[keys.components_key(prefix)] = frozenset(infra.components)
    if infra.digest:
        out[keys.infra_config_key(prefix)] = {
            "digest": infra.digest,
            "service_dependencies": to_json(infra.service_dependencies),
        }
    return out


def canonical_redis(key: str, value: RedisValue, prefix: str = keys.PREFIX) -> str:
    """A key and its value as one canonical line (the prefix normalised to ``keys.PREFIX``)."""
    name = keys.moved_to(key, prefix)
    if isinstance(value, dict):
        return name + " hash " + to_json(value)
    if isinstance(value, tuple):
        return name + " zset " + to_json(sorted([m, num(score)] for m, score in value))
    return name + " set " + to_json(sorted(value))


# --- volatile fields: heartbeats and check results that moved on ---------------------

HEARTBEAT_COLUMNS = frozenset(PG_HEARTBEAT_COLUMNS)
_HB_INDEXES = [i for i, c in enumerate(REGISTRY_COLUMNS) if c in HEARTBEAT_COLUMNS]
# The infra_status columns (and component hash fields, named alike) its latest check sets.
CHECK_COLUMNS = frozenset(("last_result", "checked_at", "response_time_ms", "error", "metadata",
                           "consecutive_failures"))  # fmt: skip
_CHECK_INDEXES = [i for i, c in enumerate(INFRA_COLUMNS) if c in CHECK_COLUMNS]


def volatile_of(key: str) -> str | None:
    """What a rendered row or key is about when part of it is volatile: the row id of an
    instance (``tenant/service/instance``: its heartbeat fields) or ``_infra/<name>`` for
    an infrastructure component (its last check); None for anything else."""
    if key.startswith("service_registry/"):
        return key[len("service_registry/") :]
    if key.startswith("infra_status/"):
        return f"{INFRA_TENANT}/{key[len('infra_status/') :]}"
    if (instance := keys.instance_of(key)) is not None:
        return row_id(*instance)
    if (component := keys.component_of(key)) is not None:
        return f"{INFRA_TENANT}/{component}"
    return None


def without_volatile(line: str) -> str:
    """A canonical line without the fields that the latest heartbeat (an instance) or
    the latest check result (an infrastructure component) sets.

    The log keeps only each instance's latest heartbeat and each component's latest
    check, so when a newer one lands past a view's checkpoint, the one the view applied
    is gone from the log: the fold up to the checkpoint cannot reproduce those fields,
    everything else it can.
    """
    head, _, body = line.partition(" ")
    if head in ("service_registry", "infra_status"):
        values = from_json(body)
        for i in _HB_INDEXES if head == "service_registry" else _CHECK_INDEXES:
            values[i] = None
        return head + " " + to_json(values)
    name, kind, body = line.split(" ", 2)
    drop = CHECK_COLUMNS if keys.component_of(name) is not None else HEARTBEAT_COLUMNS
    fields = {k: v for k, v in from_json(body).items() if k not in drop}
    return f"{name} {kind} " + to_json(fields)


# --- checksums -----------------------------------------------------------------------


def checksum(lines: Mapping[str, str]) -> str:
    """SHA-256 over the canonical lines, in key order."""
    h = hashlib.sha256()
    for key in sorted(lines):
        h.update(lines[key].encode())
        h.update(b"\n")
    return h.hexdigest()


def differences(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Human-readable differences between two canonical renderings (sorted by key)."""
    out = []
    for key in sorted(set(expected) | set(actual)):
        e, a = expected.get(key), actual.get(key)
        if e == a:
            continue
        if a is None:
            out.append(f"missing  {key}: expected {e}")
        elif e is None:
            out.append(f"extra    {key}: {a}")
        else:
            out.append(f"differs  {key}:\n    expected {e}\n    actual   {a}")
    return out
