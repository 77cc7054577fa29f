"""Reads of the live registry view in Redis (used by the query responders)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from projections.redis import instance_key, service_key, services_key


def iso(seconds: str | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(float(seconds), UTC).isoformat().replace("+00:00", "Z")


def instance_view(raw: dict[str, str]) -> dict[str, Any]:
    """One instance as the wire contract shows it."""
    return {
        "instance_id": raw["instance_id"],
        "service_name": raw["service_name"],
        "host": raw["host"],
        "port": int(raw["port"]),
        "protocol": raw["protocol"],
        "version": raw["version"],
        "health_endpoint": raw["health_endpoint"],
        "status": raw["status"],
        "metadata": json.loads(raw["metadata"]),
        "transport_preferences": json.loads(raw["transport_preferences"]),
        "depends_on": json.loads(raw["depends_on"]),
        "heartbeat_interval_s": float(raw["heartbeat_interval_s"]),
        "load": float(raw["load"]) if "load" in raw else None,
        "registered_at": iso(raw.get("registered_at")),
        "last_seen": iso(raw.get("last_seen")),
    }


def service_status(instances: list[dict[str, Any]]) -> str:
    """All instances healthy: healthy; none: unhealthy; otherwise degraded."""
    healthy = sum(1 for i in instances if i["status"] == "healthy")
    if instances and healthy == len(instances):
        return "healthy"
    return "unhealthy" if healthy == 0 else "degraded"


async def read_services(
    r: aioredis.Redis, tenant: str, *, name: str | None = None
) -> list[dict[str, Any]]:
    """Live services of a tenant (or the one named), each with all its instances."""
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
        instances = [instance_view(h) for h in (next(hashes) for _ in ids) if h]
        if instances:
            services.append(
                {"service_name": svc, "status": service_status(instances), "instances": instances}
            )
    return services
