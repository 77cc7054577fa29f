"""Redis-protocol projection of the live registry (DragonflyDB, Valkey, Redis).

Keys (``<t>`` = tenant):

* ``hub:<t>:services``                  SET of services with live instances
* ``hub:<t>:svc:<service>``             SET of the service's live instance ids
* ``hub:<t>:inst:<service>:<instance>`` HASH of one live instance
* ``hub:<t>:stats``                     HASH of counters (``rejected``, ``rejected:<code>``)
* ``hub:_meta:tenants``                 SET of tenants seen
* ``hub:_meta:checkpoint:<projection>`` HASH partition -> next position

A batch's effects and its checkpoint go in one MULTI/EXEC, guarded by WATCH on
the checkpoint key; each event's effect is a small Lua script that declares all
its keys (DragonflyDB requires that). Numbers are written as Python renders them
and only compared in Lua, so the bytes of the view are deterministic.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from events.log import LogRecord, Positions, advance, unseen
from events.model import HeartbeatReceived, InputRejected, ServiceDeregistered, ServiceRegistered

TENANTS_KEY = "hub:_meta:tenants"


def services_key(tenant: str) -> str:
    return f"hub:{tenant}:services"


def service_key(tenant: str, service: str) -> str:
    return f"hub:{tenant}:svc:{service}"


def instance_key(tenant: str, service: str, instance: str) -> str:
    return f"hub:{tenant}:inst:{service}:{instance}"


def stats_key(tenant: str) -> str:
    return f"hub:{tenant}:stats"


def checkpoint_key(projection: str) -> str:
    return f"hub:_meta:checkpoint:{projection}"


def num(value: float) -> str:
    """The one rendering of a number in the view."""
    return repr(float(value))


_REGISTER = """
local existed = redis.call('EXISTS', KEYS[1]) == 1
local ts = ARGV[1]
local registered_at = ts
local last_seen = ts
if existed then
  registered_at = redis.call('HGET', KEYS[1], 'registered_at') or ts
  local old = redis.call('HGET', KEYS[1], 'last_seen')
  if old and tonumber(old) > tonumber(ts) then last_seen = old end
else
  redis.call('HDEL', KEYS[1], 'load')
end
local fields = cjson.decode(ARGV[2])
for i = 1, #fields, 2 do redis.call('HSET', KEYS[1], fields[i], fields[i + 1]) end
redis.call('HSET', KEYS[1], 'status', 'healthy', 'registered_at', registered_at,
           'last_seen', last_seen)
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[5])
return 1
"""

_HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
local old = redis.call('HGET', KEYS[1], 'last_seen')
if not old or tonumber(old) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[2])
end
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], 'load')
else redis.call('HSET', KEYS[1], 'load', ARGV[3]) end
return 1
"""

_DEREGISTER = """
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[2]) end
return 1
"""


def instance_fields(e: ServiceRegistered) -> list[str]:
    """The hash fields a registration sets (besides status and the timestamps)."""
    return [
        "service_name", e.service_name,
        "instance_id", e.instance_id,
        "host", e.host,
        "port", str(e.port),
        "protocol", e.protocol,
        "version", e.version,
        "health_endpoint", e.health_endpoint,
        "metadata", json.dumps(e.metadata, sort_keys=True),
        "transport_preferences", json.dumps(e.transport_preferences),
        "heartbeat_interval_s", num(e.heartbeat_interval_s),
        "depends_on", json.dumps(e.depends_on),
    ]  # fmt: skip


class RedisRegistryProjection:
    """The live registry view in a Redis-protocol server."""

    def __init__(self, client: aioredis.Redis, *, name: str = "redis-registry") -> None:
        self._r = client
        self.name = name
        self._register = client.register_script(_REGISTER)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._deregister = client.register_script(_DEREGISTER)

    async def setup(self) -> None:
        return None

    async def checkpoint(self) -> Positions:
        raw = await self._r.hgetall(checkpoint_key(self.name))
        return {int(k): int(v) for k, v in raw.items()}

    async def apply(self, records: Sequence[LogRecord]) -> Positions:
        ckey = checkpoint_key(self.name)
        while True:
            async with self._r.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(ckey)
                    raw = await pipe.hgetall(ckey)
                    checkpoint = {int(k): int(v) for k, v in raw.items()}
                    todo = unseen(records, checkpoint)
                    if not todo:
                        return checkpoint
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for record in todo:
                        await self._queue(pipe, record)
                    new = advance(checkpoint, todo)
                    pipe.hset(ckey, mapping={str(p): str(n) for p, n in new.items()})
                    await pipe.execute()
                    return new
                except WatchError:
                    continue

    async def _queue(self, pipe: Any, record: LogRecord) -> None:
        e = record.event
        match e:
            case ServiceRegistered():
                await self._register(
                    keys=[
                        instance_key(e.tenant, e.service_name, e.instance_id),
                        service_key(e.tenant, e.service_name),
                        services_key(e.tenant),
                        TENANTS_KEY,
                    ],
                    args=[
                        num(e.ts),
                        json.dumps(instance_fields(e)),
                        e.instance_id,
                        e.service_name,
                        e.tenant,
                    ],
                    client=pipe,
                )
            case HeartbeatReceived():
                await self._heartbeat(
                    keys=[instance_key(e.tenant, e.service_name, e.instance_id)],
                    args=[e.status, num(e.ts), "" if e.load is None else num(e.load)],
                    client=pipe,
                )
            case ServiceDeregistered():
                await self._deregister(
                    keys=[
                        instance_key(e.tenant, e.service_name, e.instance_id),
                        service_key(e.tenant, e.service_name),
                        services_key(e.tenant),
                    ],
                    args=[e.instance_id, e.service_name],
                    client=pipe,
                )
            case InputRejected():
                pipe.hincrby(stats_key(e.tenant), "rejected", 1)
                pipe.hincrby(stats_key(e.tenant), f"rejected:{e.reason_code}", 1)
            case _:
                pass
