"""Redis-protocol projection of the live registry (DragonflyDB, Valkey, Redis).

Its keys are those of ``projections.keys``.

A batch is planned (``projections.batch``, as the PostgreSQL view does): folded over
the instances it touches (from the projection's cache of what it last wrote, else
read in one pipeline) with the same pure ``evolve`` as the hub; each touched key is
then written once, only the fields that changed (the index and the counts by what
entered, left or changed status).
Effects and checkpoint go in one Lua script (APPLY_BATCH) that first checks the
checkpoint is still the one the batch was planned on, so a second writer of the
same projection makes this one plan again, never double-apply; a checkpoint found
missing or behind what this projection applied means the view was lost (``ViewLost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis

from events.log import LogRecord, Positions, advance, unseen
from events.model import Event, InfraConfigLoaded
from handlers.infra import InfraState, fold_infra
from handlers.registry import Instance, InstanceKey
from projections.batch import BatchPlan, fold_instances, plan_batch
from projections.cache import InstanceCache
from projections.canonical import differences, from_json, to_json
from projections.fold import ViewState
from projections.keys import (
    INFRA_COMPONENTS_KEY,
    INFRA_CONFIG_KEY,
    PREFIX,
    REBUILD_LOCK_KEY,
    SHADOW_PREFIX,
    TENANTS_KEY,
    checkpoint_key,
    component_key,
    counts_key,
    every_key,
    index_key,
    index_member,
    instance_key,
    instance_keys,
    is_bookkeeping,
    moved_to,
    preservation_key,
    service_key,
    services_key,
    stats_key,
    tenant_of,
    value_type,
    view_key,
)
from projections.port import READY, ViewLost, ViewMismatch, behind
from projections.redis_render import (
    HEARTBEAT_FIELD_SET,
    REDIS_RENDERING,
    RedisValue,
    canonical_redis,
    counted,
    expected_redis,
    infra_from_redis,
    instance_from_redis,
    redis_heartbeat_fields,
    redis_infra_hash,
    redis_instance_hash,
    redis_preservation_hash,
)

# One rebuild at a time (``hub replay`` and a projector healing its view share the
# shadow keyspace): REBUILD_LOCK_KEY held while it runs, expiring in case its holder dies.
REBUILD_LOCK_MS = 10 * 60 * 1000
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# One write of a batch: (command, key, arguments).
Write = tuple[str, str, list[str]]
_COMMANDS = {"delete": "DEL", "hset": "HSET", "hdel": "HDEL", "sadd": "SADD", "srem": "SREM",
             "hincrby": "HINCRBY", "zadd": "ZADD", "zrem": "ZREM",
             "count": "HINCRBY0"}  # fmt: skip


def cmd(command: str, key: str, *args: Any, mapping: dict[str, Any] | None = None) -> Write:
    """A write to send with the batch (``mapping``: HSET's field/value pairs).

    ``count``: HINCRBY that removes the field when it comes to 0 (the counts keep
    non-zero fields only; the key goes with its last field)."""
    flat = [str(a) for a in args]
    if mapping is not None:
        for f, v in mapping.items():
            flat += (f, str(v))
    return (_COMMANDS[command], key, flat)


# Lua 5.1 (Redis, Valkey) has unpack(), Lua 5.4 (DragonflyDB) table.unpack().
_WRITE = """
local function write(w)
  if w[1] == 'HINCRBY0' then
    local k = KEYS[w[2]]
    if redis.call('HINCRBY', k, w[3][1], w[3][2]) == 0 then redis.call('HDEL', k, w[3][1]) end
  else
    redis.call(w[1], KEYS[w[2]], unpack(w[3]))
  end
end
"""
# Applies one batch atomically, if the checkpoint is still the one it was planned on.
# KEYS[1] is the checkpoint hash, KEYS[2..] every key written (declared, as DragonflyDB
# requires); ARGV[1] one JSON document (one argument, so the client encodes one value,
# not a dozen per instance): [expected checkpoint pairs, new checkpoint pairs, writes],
# a write being [command, index in KEYS, [arguments]]. Returns 0, having written
# nothing, when the checkpoint moved.
APPLY_BATCH = (
    """
local unpack = table.unpack or unpack
local batch = cjson.decode(ARGV[1])
local expected, new, writes = batch[1], batch[2], batch[3]
local cur = redis.call('HGETALL', KEYS[1])
if #cur ~= #expected then return 0 end
local have = {}
for j = 1, #cur, 2 do have[cur[j]] = cur[j + 1] end
for j = 1, #expected, 2 do
  if have[expected[j]] ~= expected[j + 1] then return 0 end
end
"""
    + _WRITE
    + """
for _, w in ipairs(writes) do write(w) end
redis.call('DEL', KEYS[1])
if #new > 0 then redis.call('HSET', KEYS[1], unpack(new)) end
return 1
"""
)
_encode_batch = msgspec.json.Encoder().encode
UNPACK_AT_MOST = 1000  # Lua's unpack() takes at most a few thousand values


# Writes without a checkpoint (the shadow keyspace of a rebuild): KEYS every key
# written, ARGV[1] the JSON list of writes as in APPLY_BATCH.
WRITE_BATCH = (
    """
local unpack = table.unpack or unpack
"""
    + _WRITE
    + """
for _, w in ipairs(cjson.decode(ARGV[1])) do write(w) end
return 1
"""
)


def batch_arguments(
    ckey: str, expected: Positions, new: Positions, writes: Sequence[Write]
) -> tuple[list[str], bytes]:
    """KEYS and the one ARGV of APPLY_BATCH."""
    keys, out = _indexed([ckey], writes)
    pairs = [[str(x) for p, n in sorted(c.items()) for x in (p, n)] for c in (expected, new)]
    return keys, _encode_batch([pairs[0], pairs[1], out])


def _indexed(
    keys: list[str], writes: Sequence[Write]
) -> tuple[list[str], list[tuple[str, int, list[str]]]]:
    """The writes with their keys as (1-based) indexes into ``keys``, which gets them."""
    index = {k: i for i, k in enumerate(keys, 1)}
    out: list[tuple[str, int, list[str]]] = []
    for command, key, values in writes:
        i = index.get(key)
        if i is None:
            keys.append(key)
            i = index[key] = len(keys)
        if len(values) <= UNPACK_AT_MOST:
            out.append((command, i, values))
        else:  # only variadic writes are ever long; an even part size keeps pairs whole
            out += [(command, i, values[at : at + UNPACK_AT_MOST])
                    for at in range(0, len(values), UNPACK_AT_MOST)]  # fmt: skip
    return keys, out


def _hash_diff(
    key: str, before: dict[str, str], after: dict[str, str] | None,
    *, only: frozenset[str] | None = None,
) -> list[Write]:  # fmt: skip
    """The commands that turn the instance hash ``before`` into ``after`` (None: the
    instance left the live view): only changed fields are written (a heartbeat
    changes three or four of ~20). ``only``: ``after`` holds just these fields, the
    others are known not to change."""
    if after is None:
        return [cmd("delete", key)] if before else []
    changed = {f: v for f, v in after.items() if before.get(f) != v}
    gone = [f for f in (before if only is None else only) if f in before and f not in after]
    writes: list[Write] = []
    if changed:
        writes.append(cmd("hset", key, mapping=changed))
    if gone:
        writes.append(cmd("hdel", key, *gone))
    return writes


def _value_writes(key: str, value: RedisValue) -> Write:
    """The write that creates ``key`` with ``value`` (a rebuild's shadow keys)."""
    if isinstance(value, dict):
        return cmd("hset", key, mapping=value)
    if isinstance(value, tuple):
        return cmd("zadd", key, *[x for m, score in value for x in (repr(score), m)])
    return cmd("sadd", key, *sorted(value))


# hub verify: consistent reads without blocking the server first, then atomic ones.
_OPTIMISTIC_SNAPSHOTS = 3
_ATOMIC_SNAPSHOTS = 10


class RedisRegistryProjection:
    """The live registry view in a Redis-protocol server (client with decode_responses)."""

    rendering = REDIS_RENDERING

    def __init__(
        self, client: aioredis.Redis, *, name: str = "redis-registry", cache: int = 50_000
    ) -> None:
        self._r = client
        self.name = name
        self._cache: InstanceCache[tuple[Instance, dict[str, str]]] = InstanceCache(cache)
        self._apply_batch = client.register_script(APPLY_BATCH)
        self._write_batch = client.register_script(WRITE_BATCH)
        self._release = client.register_script(_RELEASE)
        # What the view holds at least: the checkpoint this projection last attached to,
        # committed or rebuilt. A checkpoint found behind it means the view was lost.
        self._floor: Positions = {}
        self._run_id: str | None = None  # the server's, as last seen (a restart changes it)

    async def setup(self) -> None:
        return None

    async def warm(self) -> None:
        """Read the live instances (up to the cache's limit) into the cache, at the
        checkpoint they were read at (read again after: the scan must not straddle a
        write, else the cache stays empty)."""
        limit = self._cache.limit
        if not limit:
            return
        at = await self.checkpoint()
        names: list[str] = []
        async for k in self._r.scan_iter(match=instance_keys(), count=1000):
            names.append(k)
            if len(names) >= limit:
                break
        entries: dict[InstanceKey, tuple[Instance, dict[str, str]]] = {}
        for i in range(0, len(names), 1000):
            async with self._r.pipeline(transaction=False) as read:
                for k in names[i : i + 1000]:
                    read.hgetall(k)
                found = await read.execute()
            for k, h in zip(names[i : i + 1000], found, strict=True):
                if h:
                    inst = instance_from_redis(tenant_of(k), h)
                    entries[(inst.tenant, inst.service_name, inst.instance_id)] = (inst, h)
        if await self.checkpoint() == at:
            self._cache.load(entries, at)

    async def checkpoint(self) -> Positions:
        raw = await self._r.hgetall(checkpoint_key(self.name))
        return {int(k): int(v) for k, v in raw.items()}

    async def _server_run_id(self) -> str | None:
        """The server's run_id (None if it does not say: a restart then goes unnoticed
        as such, the checkpoint still tells a lost view)."""
        try:
            info = await self._r.info("server")
        except aioredis.ResponseError:  # INFO refused (a managed server may)
            return None
        return str(info.get("run_id")) if info.get("run_id") else None

    async def attach(self) -> Positions:
        at = await self.checkpoint()
        if (why := behind(at, self._floor)) is not None:
            raise ViewLost(why)
        self._floor = at
        self._run_id = await self._server_run_id()
        return at

    async def examine(self) -> list[str]:
        async with self._r.pipeline(transaction=False) as read:
            read.hgetall(checkpoint_key(self.name))
            read.hget(view_key(self.name), "state")
            raw, state = await read.execute()
        notices = []
        run_id = await self._server_run_id()
        if run_id != self._run_id:
            if self._run_id is not None:
                notices.append(f"the server restarted (run_id {self._run_id} -> {run_id})")
            self._run_id = run_id
        at = {int(k): int(v) for k, v in raw.items()}
        if (why := behind(at, self._floor)) is not None:
            raise ViewLost("; ".join([why, *notices]))
        if state is None:
            await self.mark(READY, "the view's state was missing; its checkpoint is intact")
            notices.append("the view's state was missing (its checkpoint intact): set ready")
        return notices

    async def mark(self, state: str, reason: str = "") -> None:
        await self._r.hset(view_key(self.name),
                           mapping={"state": state, "since": repr(time.time()),
                                    "reason": reason})  # fmt: skip

    async def apply(self, records: Sequence[LogRecord]) -> Positions:
        ckey = checkpoint_key(self.name)
        # The checkpoint the cache is valid at is this writer's last commit; if anything
        # else moved it since, the script refuses the batch and it is planned again
        # (from the checkpoint found, unless that one is behind: the view was lost).
        checkpoint = self._cache.at
        while True:
            if checkpoint is None:
                checkpoint = await self.checkpoint()
                if (why := behind(checkpoint, self._floor)) is not None:
                    self._cache.clear()
                    raise ViewLost(why)
            todo = unseen(records, checkpoint)
            if not todo:
                return checkpoint
            self._cache.valid_at(checkpoint)
            try:
                plan = plan_batch(todo)
                writes, written = await self._plan(plan)
                writes += await self._plan_infra(plan.infra)
                new = advance(checkpoint, todo)
                keys, batch = batch_arguments(ckey, checkpoint, new, writes)
                done = await self._apply_batch(keys=keys, args=[batch])
            except BaseException:
                self._cache.clear()  # its instances may be folded further than written
                raise
            if done:
                self._cache.remember(written, new)
                self._floor = new
                return new
            self._cache.clear()
            checkpoint = None

    async def _plan(
        self, plan: BatchPlan
    ) -> tuple[list[Write], dict[InstanceKey, tuple[Instance, dict[str, str]] | None]]:
        """Fold the batch over the keys it touches; the commands that write the result,
        and each touched instance as written (None: not in the live view)."""
        before: dict[InstanceKey, dict[str, str]] = {}
        known: dict[InstanceKey, Instance] = {}
        cached = self._cache.entries
        for k in plan.instances:
            if (hit := cached.get(k)) is not None:
                known[k], before[k] = hit
        unknown = [k for k in plan.instances if k not in before]
        # Only membership events can make an instance enter or leave the live view, so
        # only their services' sizes are read and set written.
        services = plan.membership
        found: list[Any] = []
        if unknown or services:
            async with self._r.pipeline(transaction=False) as read:
                for k in unknown:
                    read.hgetall(instance_key(*k))
                for t, s in services:
                    read.scard(service_key(t, s))
                found = await read.execute()
        for k, h in zip(unknown, found[: len(unknown)], strict=True):
            if h:
                before[k] = h
                known[k] = instance_from_redis(k[0], h)
        sizes = {ts: int(n) for ts, n in zip(services, found[len(unknown) :], strict=True)}
        # What the touched instances count in before the batch (the counts by status).
        counts: dict[tuple[str, str], Counter[str]] = {}
        for k, h in before.items():
            if (c := counts.get(k[:2])) is None:  # not setdefault: a Counter per instance
                c = counts[k[:2]] = Counter()
            for f in counted(h["status"], h["flapping"] == "1"):
                c[f] -= 1
        writes: list[Write] = []
        written: dict[InstanceKey, tuple[Instance, dict[str, str]] | None] = {}
        entered: dict[tuple[str, str], list[str]] = {}
        left: dict[tuple[str, str], list[str]] = {}
        for k, inst, heartbeats_only in fold_instances(plan, known, exact=cached):
            live = inst is not None and inst.live
            if inst is not None and live:
                if (c := counts.get(k[:2])) is None:
                    c = counts[k[:2]] = Counter()
                for f in counted(inst.status, inst.flapping):
                    c[f] += 1
            if live != (k in before):
                (entered if live else left).setdefault(k[:2], []).append(k[2])
            if inst is not None and live and heartbeats_only:
                # Only heartbeats, on an instance as this view last wrote it: only the
                # heartbeat fields can differ (the model test holds this to the fold).
                hb = redis_heartbeat_fields(inst)
                old = before[k]
                writes.extend(_hash_diff(instance_key(*k), old, hb, only=HEARTBEAT_FIELD_SET))
                old.update(hb)  # the cached entry, updated in place
                if "load" not in hb:
                    old.pop("load", None)
                continue
            rendered = redis_instance_hash(inst) if inst is not None and live else None
            writes.extend(_hash_diff(instance_key(*k), before.get(k, {}), rendered))
            written[k] = (inst, rendered) if inst is not None and rendered is not None else None
        index_in: dict[str, list[str]] = {}
        index_out: dict[str, list[str]] = {}
        for (t, s), ids in sorted(entered.items()):
            writes.append(cmd("sadd", service_key(t, s), *sorted(ids)))
            index_in.setdefault(t, []).extend(index_member(s, i) for i in sorted(ids))
        for (t, s), ids in sorted(left.items()):
            writes.append(cmd("srem", service_key(t, s), *sorted(ids)))
            index_out.setdefault(t, []).extend(index_member(s, i) for i in sorted(ids))
        for t, members in sorted(index_in.items()):
            writes.append(cmd("zadd", index_key(t), *[x for m in members for x in ("0", m)]))
        for t, members in sorted(index_out.items()):
            writes.append(cmd("zrem", index_key(t), *members))
        for (t, s), size in sizes.items():
            live_now = size + len(entered.get((t, s), ())) - len(left.get((t, s), ()))
            writes.append(cmd("sadd" if live_now else "srem", services_key(t), s))
        for (t, s), c in sorted(counts.items()):
            for f, n in sorted(c.items()):
                if n:
                    writes.append(cmd("count", counts_key(t, s), f, n))
        if plan.registered:
            writes.append(cmd("sadd", TENANTS_KEY, *sorted(plan.registered)))
        stats: Counter[tuple[str, str]] = Counter()
        for e in plan.rejections:
            stats[(e.tenant, "rejected")] += 1
            stats[(e.tenant, f"rejected:{e.reason_code}")] += 1
        for (t, field), n in sorted(stats.items()):
            writes.append(cmd("hincrby", stats_key(t), field, n))
        for t, started in sorted(plan.preservation.items()):
            writes.append(cmd("delete", preservation_key(t)))
            if started is not None:
                mapping = redis_preservation_hash(started.ts, started.until)
                writes.append(cmd("hset", preservation_key(t), mapping=mapping))
        return writes, written

    async def _plan_infra(self, events: Sequence[Event]) -> list[Write]:
        """Fold the batch's infrastructure events over the components they touch."""
        if not events:
            return []
        names: set[str] = await self._r.smembers(INFRA_COMPONENTS_KEY)  # type: ignore[assignment]
        ordered = sorted(names)
        async with self._r.pipeline(transaction=False) as read:
            for n in ordered:
                read.hgetall(component_key(n))
            read.hgetall(INFRA_CONFIG_KEY)
            found = await read.execute()
        state = InfraState({n: infra_from_redis(h) for n, h in zip(ordered, found, strict=False)
                            if h})  # fmt: skip
        config = found[-1]
        if config:
            state.digest = config["digest"]
            state.service_dependencies = from_json(config["service_dependencies"])
        changed, gone = fold_infra(state, events)
        writes: list[Write] = [cmd("delete", component_key(n)) for n in gone]
        for n in changed:
            writes.append(cmd("delete", component_key(n)))
            writes.append(cmd("hset", component_key(n),
                              mapping=redis_infra_hash(state.components[n])))  # fmt: skip
        writes.append(cmd("delete", INFRA_COMPONENTS_KEY))
        if state.components:
            writes.append(cmd("sadd", INFRA_COMPONENTS_KEY, *sorted(state.components)))
        if any(isinstance(e, InfraConfigLoaded) for e in events):
            writes.append(cmd("hset", INFRA_CONFIG_KEY, mapping={
                "digest": state.digest,
                "service_dependencies": to_json(state.service_dependencies),
            }))  # fmt: skip
        return writes

    # --- verify and rebuild ----------------------------------------------------------

    async def _names(self, prefix: str) -> list[str]:
        """The keys under ``prefix`` that belong to the view (checkpoints and the view's
        state aside)."""
        return [k async for k in self._r.scan_iter(match=every_key(prefix), count=1000)
                if not is_bookkeeping(k, prefix)]  # fmt: skip

    async def _read_values(
        self, names: list[str], *, atomic: bool = False
    ) -> tuple[Positions, dict[str, RedisValue]]:
        """The checkpoint and each key's value (``atomic``: all read in one MULTI/EXEC, a
        consistent cut, which holds the server up while it runs).

        The key's name says its type (``keys.value_type``), which saves a TYPE round per key; a
        key of the wrong type reads as an error marker, so verification reports it
        instead of failing. A key gone since it was listed is left out.
        """
        kinds = [value_type(k) for k in names]
        async with self._r.pipeline(transaction=atomic) as pipe:
            pipe.hgetall(checkpoint_key(self.name))
            for k, kind in zip(names, kinds, strict=True):
                if kind == "hash":
                    pipe.hgetall(k)
                elif kind == "zset":
                    pipe.zrange(k, 0, -1, withscores=True)
                else:
                    pipe.smembers(k)
            raw, *values = await pipe.execute(raise_on_error=False)
        if isinstance(raw, Exception):
            raise raw
        out: dict[str, RedisValue] = {}
        for k, kind, v in zip(names, kinds, values, strict=True):
            if isinstance(v, Exception):
                out[k] = {"<error>": str(v)}
            elif not v:
                continue
            elif kind == "hash":
                out[k] = v
            elif kind == "zset":
                out[k] = tuple(sorted((m, float(score)) for m, score in v))
            else:
                out[k] = frozenset(v)
        return {int(p): int(n) for p, n in raw.items()}, out

    async def _read_keys(self, prefix: str) -> dict[str, RedisValue]:
        """Every key under ``prefix`` (checkpoints aside) with its value."""
        _, out = await self._read_values(await self._names(prefix))
        return out

    async def snapshot(self) -> tuple[Positions, dict[str, str]]:
        """The checkpoint and every key, canonical, as of one moment.

        Read without holding the server up first: valid if the checkpoint did not move
        meanwhile (every batch moves it). On a busy view that rarely holds, so then the
        values are read in one MULTI/EXEC with the checkpoint, valid if listing the keys
        again finds none that was not read (a key created between the listing and the
        transaction would be missing from it).
        """
        values: dict[str, RedisValue] = {}
        for _ in range(_OPTIMISTIC_SNAPSHOTS):
            before = await self.checkpoint()
            at, values = await self._read_values(await self._names(PREFIX))
            if at == before and await self.checkpoint() == before:
                return at, {k: canonical_redis(k, v) for k, v in values.items()}
        for _ in range(_ATOMIC_SNAPSHOTS):
            names = await self._names(PREFIX)
            at, values = await self._read_values(names, atomic=True)
            if not set(await self._names(PREFIX)) - set(names):
                break
        return at, {k: canonical_redis(k, v) for k, v in values.items()}

    @contextlib.asynccontextmanager
    async def _rebuild_lock(self) -> AsyncIterator[None]:
        token = uuid.uuid4().hex
        # Polled: the holder is another process (a replay, another hub's projector).
        while not await self._r.set(REBUILD_LOCK_KEY, token, nx=True, px=REBUILD_LOCK_MS):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        try:
            yield
        finally:
            await self._release(keys=[REBUILD_LOCK_KEY], args=[token])

    async def rebuild(self, view: ViewState, positions: Positions) -> None:
        """Write the fold into a shadow keyspace, check it, then swap it in with one
        MULTI/EXEC (old keys deleted, shadow keys renamed, checkpoint set, the view's
        state ready). One rebuild at a time: a second one waits for the first."""
        async with self._rebuild_lock():
            await self._rebuild(view, positions)

    async def _rebuild(self, view: ViewState, positions: Positions) -> None:
        self._cache.clear()
        stale = [k async for k in self._r.scan_iter(match=every_key(SHADOW_PREFIX), count=1000)]
        if stale:
            await self._r.delete(*stale)
        expected = expected_redis(view, prefix=SHADOW_PREFIX)
        writes = [_value_writes(key, value) for key, value in expected.items()]
        for at in range(0, len(writes), 1000):  # one script per 1,000 keys
            keys, out = _indexed([], writes[at : at + 1000])
            await self._write_batch(keys=keys, args=[_encode_batch(out)])
        written = await self._read_keys(SHADOW_PREFIX)
        problems = differences(
            {k: canonical_redis(k, v, SHADOW_PREFIX) for k, v in expected.items()},
            {k: canonical_redis(k, v, SHADOW_PREFIX) for k, v in written.items()},
        )
        if problems:
            raise ViewMismatch("\n".join(problems[:20]))
        ckey = checkpoint_key(self.name)
        live = await self._names(PREFIX)
        async with self._r.pipeline(transaction=True) as pipe:
            renamed = {moved_to(k, SHADOW_PREFIX) for k in expected}
            gone = [k for k in live if k not in renamed]
            if gone:
                pipe.delete(*gone)
            for k in expected:
                pipe.rename(k, moved_to(k, SHADOW_PREFIX))
            pipe.delete(ckey)
            if positions:
                pipe.hset(ckey, mapping={str(p): str(n) for p, n in positions.items()})
            pipe.hset(view_key(self.name), mapping={"state": READY, "since": repr(time.time()),
                                                     "reason": "rebuilt from the log"})  # fmt: skip
            await pipe.execute()
        self._floor = dict(positions)
