"""Reads of the live registry view in Redis (used by the query responders).

Every read here costs what it returns, not what the tenant holds: instances are
read a page at a time through the tenant's index (``hub:<t>:index``, by member
order), counted with ZCARD / ZLEXCOUNT, and a service's health comes from the
counts the projection keeps (``hub:<t>:counts:<service>``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec
import redis.asyncio as aioredis
import redis.exceptions

from events.vocab import Condition, Health
from projections.keys import (
    INFRA_COMPONENTS_KEY,
    INFRA_CONFIG_KEY,
    before_service,
    checkpoint_key,
    component_key,
    counts_key,
    index_key,
    index_member,
    instance_key,
    preservation_key,
    service_members,
    services_key,
    split_member,
    view_key,
)
from projections.port import READY, REBUILDING
from projections.redis_render import instance_doc, iso

# The instance fields a query reads, in this order: the rendered ``doc`` of the
# fields that change only on registration, then those that change with heartbeats and
# status (``instance_view``, ``instance_json``).
VIEW_FIELDS = (
    "doc", "status", "flapping", "reported_status", "status_since", "checks", "load",
    "last_seen",
)  # fmt: skip
# Many instances in one command: one reply of values only, which the (C) parser reads
# at once, where a pipeline of HGETALLs cost the client a parse, a timeout and a
# bookkeeping step per instance, and field names (two thirds of a 500-instance query's
# time, measured). The keys are declared, so it runs on Dragonfly too; at most
# READ_CHUNK keys per call keep each script short (a few ms), so the projector's
# writes and small queries get their turn between them.
READ_INSTANCES = """
local unpack = table.unpack or unpack
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HMGET', key, unpack(ARGV)) end
return out
"""
READ_INSTANCES_SHA = hashlib.sha1(READ_INSTANCES.encode()).hexdigest()
READ_CHUNK = 250

_json = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode


def _dynamic(raw: list[str | None], preserving: bool) -> dict[str, Any]:
    """The fields of ``VIEW_FIELDS`` after ``doc`` as the answers show them (``checks``
    left as the JSON it is stored as)."""
    _, status, flapping, reported_status, status_since, checks, load, last_seen = raw
    return {
        "status": status,
        "flapping": flapping == "1",
        "at_risk": preserving and status == Health.CRITICAL,
        "reported_status": reported_status or status,
        "status_since": iso(status_since),
        "checks": msgspec.Raw((checks or "{}").encode()),
        "load": float(load) if load is not None else None,
        "last_seen": iso(last_seen),
    }


def instance_json(raw: list[str | None], *, preserving: bool = False) -> msgspec.Raw:
    """One instance as the wire contract shows it, from its ``VIEW_FIELDS``, as JSON
    ready to be embedded in an answer (its ``doc`` is not parsed).

    ``at_risk``: the instance is critical while its tenant is in self-preservation,
    so the hub is not sure it is really gone (it does not expire meanwhile).
    """
    doc = raw[0]
    assert doc is not None
    dynamic = _encode(_dynamic(raw, preserving))
    return msgspec.Raw(doc[:-1].encode() + b"," + dynamic[1:])


def instance_view(raw: list[str | None], *, preserving: bool = False) -> dict[str, Any]:
    """One instance as the wire contract shows it, as a dict (for filters and picks)."""
    doc = raw[0]
    assert doc is not None
    out: dict[str, Any] = _json.decode(doc)
    dynamic = _dynamic(raw, preserving)
    dynamic["checks"] = _json.decode(dynamic["checks"])
    out.update(dynamic)
    return out


def is_healthy(instance: dict[str, Any]) -> bool:
    """Healthy and to be trusted: reports healthy and is not flapping."""
    return bool(instance["status"] == Health.HEALTHY and not instance["flapping"])


def overall(statuses: list[Condition]) -> Condition:
    """The tenant's health from its services': all HEALTHY -> HEALTHY, all UNHEALTHY ->
    UNHEALTHY, otherwise DEGRADED; UNKNOWN when no service is registered."""
    if not statuses:
        return Condition.UNKNOWN
    if all(s == Condition.HEALTHY for s in statuses):
        return Condition.HEALTHY
    if all(s == Condition.UNHEALTHY for s in statuses):
        return Condition.UNHEALTHY
    return Condition.DEGRADED


async def read_preservation(r: aioredis.Redis, tenant: str) -> dict[str, Any] | None:
    """The tenant's self-preservation period in force, if any."""
    raw: dict[str, str] = await r.hgetall(preservation_key(tenant))  # type: ignore[assignment]
    if not raw:
        return None
    return {"since": iso(raw["since"]), "until": iso(raw["until"])}


async def read_view_state(r: aioredis.Redis, projection: str) -> tuple[str, str] | None:
    """Why the view cannot be read now, as (state, reason); None: it can.

    It can while its projector says READY or it has a checkpoint (an older view its
    projector has not seen yet). It cannot while its projector rebuilds it
    (``REBUILDING``), nor with neither state nor checkpoint (``missing``): emptied (a
    restart of a memory-only server, a flush), or its projector has not started yet.
    """
    async with r.pipeline(transaction=False) as pipe:
        pipe.hgetall(view_key(projection))
        pipe.exists(checkpoint_key(projection))
        state, checkpoint = await pipe.execute()
    if state.get("state") == REBUILDING:
        return REBUILDING, f"the view is being rebuilt from the event log ({state.get('reason')})"
    if checkpoint or state.get("state") == READY:
        return None
    return "missing", "the view holds nothing (lost, or not built yet): the hub rebuilds it"


async def read_index(
    r: aioredis.Redis, tenant: str, *, after: str | None = None, service: str | None = None,
    count: int,
) -> list[str]:  # fmt: skip
    """At most ``count`` members of the tenant's index in order, after the member
    ``after`` (exclusive; None: from the start), only ``service``'s if given. Each member
    is ``<service> <instance>`` (``split_member``)."""
    low, high = "-", "+"
    if service is not None:
        low, high = service_members(service)
    if after is not None and (service is None or after >= index_member(service, "")):
        low = f"({after}"
    members = await r.zrangebylex(index_key(tenant), low, high, start=0, num=count)
    return [str(m) for m in members]


async def count_instances(r: aioredis.Redis, tenant: str, service: str | None = None) -> int:
    """Live instances of the tenant (or of one service), from the index."""
    if service is None:
        return int(await r.zcard(index_key(tenant)))
    return int(await r.zlexcount(index_key(tenant), *service_members(service)))


async def service_rank(r: aioredis.Redis, tenant: str, service: str) -> int:
    """The rank in the index of the service's first member (the members before it)."""
    return int(await r.zlexcount(index_key(tenant), "-", before_service(service)))


async def read_ranks(r: aioredis.Redis, tenant: str, ranges: list[tuple[int, int]]) -> list[str]:
    """The index's members at ranks ``[first, last]`` of each range, in turn (every score
    is 0: rank order is member order)."""
    async with r.pipeline(transaction=False) as pipe:
        for first, last in ranges:
            pipe.zrange(index_key(tenant), first, last)
        found: list[list[str]] = await pipe.execute()
    return [m for part in found for m in part]


async def read_instances(
    r: aioredis.Redis, tenant: str, members: list[str]
) -> list[list[str | None] | None]:
    """The ``VIEW_FIELDS`` of the instances of index members, in turn (None for one gone
    since), in one command per READ_CHUNK (the script loaded again if the server lost
    it). An instance written before hashes carried ``doc`` gets it rendered here."""
    found: list[list[str | None] | None] = []
    for at in range(0, len(members), READ_CHUNK):
        keys = [instance_key(tenant, *split_member(m)) for m in members[at : at + READ_CHUNK]]
        try:
            rows = await r.evalsha(READ_INSTANCES_SHA, len(keys), *keys, *VIEW_FIELDS)
        except redis.exceptions.NoScriptError:
            rows = await r.eval(READ_INSTANCES, len(keys), *keys, *VIEW_FIELDS)
        older = [i for i, row in enumerate(rows) if row[0] is None and row[1] is not None]
        if older:
            async with r.pipeline(transaction=False) as pipe:
                for i in older:
                    pipe.hgetall(keys[i])
                for i, h in zip(older, await pipe.execute(), strict=True):
                    rows[i][0] = instance_doc(h) if h else None
        found += [row if row[1] is not None and row[0] is not None else None for row in rows]
    return found


async def read_counts(r: aioredis.Redis, tenant: str, services: list[str]) -> list[dict[str, str]]:
    """Each service's counts (``hub:<t>:counts:<service>``), in turn ({}: no live one)."""
    if not services:
        return []
    async with r.pipeline(transaction=False) as pipe:
        for s in services:
            pipe.hgetall(counts_key(tenant, s))
        counts: list[dict[str, str]] = await pipe.execute()
    return counts


async def read_service_names(r: aioredis.Redis, tenant: str) -> list[str]:
    """The tenant's services with live instances, sorted."""
    names = await r.smembers(services_key(tenant))
    return sorted(str(n) for n in names)


def counted_status(counts: dict[str, str]) -> tuple[int, int]:
    """(live instances, trusted ones: healthy and not flapping) from a service's counts."""
    live = sum(int(n) for f, n in counts.items() if f.startswith("status:"))
    return live, int(counts.get("trusted", 0))


def health_of(counts: dict[str, str]) -> Condition:
    """``aggregate`` from a service's counts: HEALTHY / DEGRADED / UNHEALTHY."""
    live, trusted = counted_status(counts)
    if live and trusted == live:
        return Condition.HEALTHY
    return Condition.DEGRADED if trusted else Condition.UNHEALTHY


def service_health(name: str, counts: dict[str, str], *, preserving: bool) -> dict[str, Any]:
    """One service of ``hub.query.health``, from its counts (at risk: critical while the
    tenant self-preserves)."""
    by_status = {f[len("status:") :]: int(n) for f, n in sorted(counts.items())
                 if f.startswith("status:")}  # fmt: skip
    return {
        "service_name": name, "status": health_of(counts), "instances": sum(by_status.values()),
        "by_status": by_status, "flapping": int(counts.get("flapping", 0)),
        "at_risk": by_status.get(Health.CRITICAL, 0) if preserving else 0,
    }  # fmt: skip


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
