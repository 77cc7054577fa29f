"""Reads of the live registry view in Redis (used by the query responders)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from projections.redis import (
    INFRA_COMPONENTS_KEY,
    INFRA_CONFIG_KEY,
    component_key,
    instance_key,
    preservation_key,
    service_key,
    services_key,
)


def iso(seconds: str | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(float(seconds), UTC).isoformat().replace("+00:00", "Z")


def instance_view(raw: dict[str, str], *, preserving: bool = False) -> dict[str, Any]:
    """One instance as the wire contract shows it.

    ``at_risk``: the instance is critical while its tenant is in self-preservation,
    so the hub is not sure it is really gone (it does not expire meanwhile).
    """
    status = raw["status"]
    return {
        "instance_id": raw["instance_id"],
        "service_name": raw["service_name"],
        "host": raw["host"],
        "port": int(raw["port"]),
        "protocol": raw["protocol"],
        "version": raw["version"],
        "health_endpoint": raw["health_endpoint"],
        "status": status,
        "flapping": raw.get("flapping") == "1",
        "at_risk": preserving and status == "critical",
        "reported_status": raw.get("reported_status", status),
        "status_since": iso(raw.get("status_since")),
        "ttl_s": float(raw.get("ttl_s", 0.0)),
        "expire_after_s": float(raw.get("expire_after_s", 0.0)),
        "checks": json.loads(raw.get("checks", "{}")),
        "metadata": json.loads(raw["metadata"]),
        "transport_preferences": json.loads(raw["transport_preferences"]),
        "depends_on": json.loads(raw["depends_on"]),
        "heartbeat_interval_s": float(raw["heartbeat_interval_s"]),
        "load": float(raw["load"]) if "load" in raw else None,
        "registered_at": iso(raw.get("registered_at")),
        "last_seen": iso(raw.get("last_seen")),
    }


def is_healthy(instance: dict[str, Any]) -> bool:
    """Healthy and to be trusted: reports healthy and is not flapping."""
    return bool(instance["status"] == "healthy" and not instance["flapping"])


def aggregate(instances: list[dict[str, Any]]) -> str:
    """A service's health: every instance healthy -> HEALTHY; some -> DEGRADED; none ->
    UNHEALTHY (degraded, unhealthy, critical and flapping instances are not healthy)."""
    healthy = sum(1 for i in instances if is_healthy(i))
    if instances and healthy == len(instances):
        return "HEALTHY"
    return "DEGRADED" if healthy else "UNHEALTHY"


def overall(statuses: list[str]) -> str:
    """The tenant's health from its services': all HEALTHY -> HEALTHY, all UNHEALTHY ->
    UNHEALTHY, otherwise DEGRADED; UNKNOWN when no service is registered."""
    if not statuses:
        return "UNKNOWN"
    if all(s == "HEALTHY" for s in statuses):
        return "HEALTHY"
    return "UNHEALTHY" if all(s == "UNHEALTHY" for s in statuses) else "DEGRADED"


def service_status(instances: list[dict[str, Any]]) -> str:
    """``aggregate`` in the lower case of ``hub.query.services``."""
    return aggregate(instances).lower()


async def read_preservation(r: aioredis.Redis, tenant: str) -> dict[str, Any] | None:
    """The tenant's self-preservation period in force, if any."""
    raw: dict[str, str] = await r.hgetall(preservation_key(tenant))  # type: ignore[assignment]
    if not raw:
        return None
    return {"since": iso(raw["since"]), "until": iso(raw["until"])}


async def read_services(
    r: aioredis.Redis, tenant: str, *, name: str | None = None
) -> list[dict[str, Any]]:
    """Live services of a tenant (or the one named), each with all its instances."""
    preserving = await read_preservation(r, tenant) is not None
    if name is not None:
        names = [name]
    else:
        # The client decodes responses (decode_responses=True): members are str.
        members_of: set[str] = await r.smembers(services_key(tenant))  # type: ignore[assignment]
        names = sorted(members_of)
    async with r.pipeline(transaction=False) as pipe:
        for svc in names:
            pipe.smembers(service_key(tenant, svc))
        members: list[set[str]] = await pipe.execute()
    wanted = [(svc, sorted(ids)) for svc, ids in zip(names, members, strict=True) if ids]
    async with r.pipeline(transaction=False) as pipe:
        for svc, ids in wanted:
            for iid in ids:
                pipe.hgetall(instance_key(tenant, svc, iid))
        hashes = iter(await pipe.execute())
    services = []
    for svc, ids in wanted:
        instances = [
            instance_view(h, preserving=preserving) for h in (next(hashes) for _ in ids) if h
        ]
        if instances:
            services.append(
                {"service_name": svc, "status": service_status(instances), "instances": instances}
            )
    return services


def component_view(raw: dict[str, str], dependents: list[str]) -> dict[str, Any]:
    """One infrastructure component as ``hub.query.infrastructure`` shows it."""
    config = json.loads(raw["config"])
    last = None
    if "last_result" in raw:
        last = {
            "result": raw["last_result"], "checked_at": iso(raw["checked_at"]),
            "response_time_ms": float(raw["response_time_ms"]), "error": raw["error"],
            "metadata": json.loads(raw["metadata"]),
            "consecutive_failures": int(raw["consecutive_failures"]),
        }  # fmt: skip
    return {**config, "name": raw["component"], "status": raw["status"],
            "status_since": iso(raw["status_since"]), "last_check": last,
            "dependents": dependents}  # fmt: skip


async def read_infrastructure(r: aioredis.Redis) -> list[dict[str, Any]]:
    """Every monitored component (sorted by name) with the services requiring it."""
    names: set[str] = await r.smembers(INFRA_COMPONENTS_KEY)  # type: ignore[assignment]
    ordered = sorted(names)
    async with r.pipeline(transaction=False) as pipe:
        for n in ordered:
            pipe.hgetall(component_key(n))
        pipe.hget(INFRA_CONFIG_KEY, "service_dependencies")
        found = await pipe.execute()
    requires: dict[str, list[str]] = json.loads(found[-1] or "{}")
    out = []
    for n, raw in zip(ordered, found, strict=False):
        if raw:
            dependents = sorted(s for s, needs in requires.items() if n in needs)
            out.append(component_view(raw, dependents))
    return out
