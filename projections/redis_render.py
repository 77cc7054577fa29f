"""How the fold looks in the Redis view (pure): the one rendering of each key's value.

The projection writes these values (keys from ``projections.keys``), rebuild writes
``expected_redis`` of the fold, the readers answer queries from them (``iso``,
``instance_doc``), and ``hub verify`` compares the keyspace with the fold, line by
line (``canonical_redis``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import UTC, datetime

import msgspec

from handlers.infra import InfraComponent
from handlers.registry import HEALTHY, Instance
from projections import keys
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


def num(value: float) -> str:
    """The one rendering of a number in the Redis view."""
    return repr(float(value))


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
        last = last_check(h["component"], {
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


def expected_lines(view: ViewState) -> dict[str, str]:
    """The canonical lines of every key the Redis view must hold."""
    return {k: canonical_redis(k, v) for k, v in expected_redis(view).items()}


# --- verify: volatile fields -------------------------------------------------------------

HEARTBEAT_FIELD_SET = frozenset(HEARTBEAT_FIELDS)
_CHECK_SET = frozenset(CHECK_FIELDS)


def volatile_of(key: str) -> str | None:
    """What a key is about when part of it is volatile: the instance of an instance hash
    (its heartbeat fields), the component of a component hash (its last check)."""
    if (instance := keys.instance_of(key)) is not None:
        return instance_subject(*instance)
    if (component := keys.component_of(key)) is not None:
        return component_subject(component)
    return None


def without_volatile(line: str) -> str:
    """A canonical line of an instance or component hash without its volatile fields."""
    name, kind, body = line.split(" ", 2)
    if keys.component_of(name) is not None:
        drop = _CHECK_SET
    elif keys.instance_of(name) is not None:
        drop = HEARTBEAT_FIELD_SET
    else:
        return line
    fields = {k: v for k, v in from_json(body).items() if k not in drop}
    return f"{name} {kind} " + to_json(fields)


REDIS_RENDERING = Rendering(expected_lines, volatile_of, without_volatile)
