"""``hub.query.*`` responders: request-reply over NATS, StandardResponse replies.

Subjects are ``hub.query.<view>`` (tenant ``default``) or
``hub.query.<view>.<tenant>``. Each request is handled in its own task, so a
request waiting for ``min_seq`` never holds up the others.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from events.names import is_name
from events.subjects import QUERY_PREFIX, query_route
from events.wire import (
    HealthQuery,
    InfrastructureQuery,
    InstancesQuery,
    ServiceQuery,
    ServicesQuery,
    StandardResponse,
    StatusQuery,
    WireError,
    encode_response,
    parse_query,
)
from hub.config import HubConfig
from hub.metrics import Metrics
from hub.progress import Progress
from hub.status import HubStatus
from projections.redis_read import (
    aggregate,
    is_healthy,
    overall,
    read_infrastructure,
    read_preservation,
    read_services,
)

log = structlog.get_logger(__name__)

REDIS_VIEW = "redis-registry"
MAX_IN_FLIGHT = 1000


class QueryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class QueryService:
    """Answers ``hub.query.*`` from the live views."""

    def __init__(
        self,
        redis: aioredis.Redis,
        config: HubConfig,
        *,
        progress: Progress,
        metrics: Metrics,
        status: HubStatus | None = None,
        status_details: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self._redis = redis
        self._status = status
        self._status_details = status_details
        self._config = config
        self._progress = progress
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._reply_budget = 1024 * 1024 - 4096
        self._sub: Subscription | None = None
        self._views: dict[str, Callable[[str, bytes], Awaitable[Answer]]] = {
            "services": self._services,
            "service": self._service,
            "instances": self._instances,
            "health": self._health,
            "infrastructure": self._infrastructure,
            "status": self._hub_status,
        }
        self._round_robin: dict[tuple[str, ...], int] = {}
        self._random = random.Random()

    async def start(self, nc: Client) -> None:
        # Replies must fit the server's max payload; leave room for the envelope.
        self._reply_budget = max(nc.max_payload - 4096, 4096)
        self._sub = await nc.subscribe(f"{QUERY_PREFIX}.>", queue="hub-query", cb=self._on_msg)
        await nc.flush()  # the server knows the subscription before start() returns

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
        for t in list(self._tasks):
            t.cancel()

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:
            self._metrics.inc("query_without_reply_subject")
            return
        if len(self._tasks) >= MAX_IN_FLIGHT:
            reply = StandardResponse(success=False, error_code="BUSY",
                                     error_message="too many queries in flight, retry")  # fmt: skip
            await msg.respond(encode_response(reply))
            return
        task = asyncio.create_task(self._respond(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respond(self, msg: Msg) -> None:
        reply = await self.handle(msg.subject, msg.data or b"")
        try:
            await msg.respond(reply)
        except Exception as exc:  # the asker went away; nothing to do
            log.info("query_reply_failed", subject=msg.subject, error=repr(exc))

    async def handle(self, subject: str, payload: bytes) -> bytes:
        """Answer one request (the NATS-free core of the responder)."""
        started = time.perf_counter()
        correlation_id: str | None = None
        try:
            r = query_route(subject)
            if r.tenant_error is not None:
                raise QueryError("INVALID_TENANT", r.tenant_error)
            if not self._config.tenant_allowed(r.tenant):
                raise QueryError("UNKNOWN_TENANT", f"tenant {r.tenant!r} is not served here")
            view = self._views.get(r.kind)
            if view is None:
                raise QueryError(
                    "UNKNOWN_QUERY",
                    f"no query {r.kind!r}; known: {', '.join(sorted(self._views))}",
                )
            if len(payload) > self._config.max_message_bytes:
                raise QueryError("PAYLOAD_TOO_LARGE", f"request is {len(payload)} bytes")
            answer = await view(r.tenant, payload)
            correlation_id = answer.correlation_id
            response = StandardResponse(success=True, data=answer.data, metadata=answer.metadata)
            self._metrics.inc(f"query_ok:{r.kind}")
        except QueryError as exc:
            response = StandardResponse(success=False, error_code=exc.code,
                                        error_message=exc.message)  # fmt: skip
            self._metrics.inc(f"query_error:{exc.code}")
        except WireError as exc:
            response = StandardResponse(success=False, error_code=exc.code,
                                        error_message=exc.reason)  # fmt: skip
            self._metrics.inc(f"query_error:{exc.code}")
        except Exception as exc:  # a bug or a dead view: answer, keep serving
            log.exception("query_failed", subject=subject)
            response = StandardResponse(success=False, error_code="INTERNAL_ERROR",
                                        error_message=type(exc).__name__)  # fmt: skip
            self._metrics.inc("query_error:INTERNAL_ERROR")
        note = self._status.degraded_note() if self._status is not None else None
        if note is not None:
            response.metadata = {**response.metadata, "degraded": note}
        response.correlation_id = correlation_id or uuid.uuid4().hex
        response.processing_time_ms = round((time.perf_counter() - started) * 1000, 3)
        return encode_response(response)

    async def _await_seq(self, min_seq: int | None) -> None:
        if min_seq is None or min_seq == 0:
            return
        if not await self._progress.wait(REDIS_VIEW, min_seq, self._config.min_seq_wait_s):
            raise QueryError(
                "NOT_YET_PROCESSED",
                f"the view does not reflect ingress sequence {min_seq} yet "
                f"(ingested through {self._progress.ingested_seq}); retry",
            )

    async def _services(self, tenant: str, payload: bytes) -> Answer:
        q = parse_query(payload, ServicesQuery)
        await self._await_seq(q.min_seq)
        services = await read_services(self._redis, tenant, name=q.name)
        out = []
        for svc in services:
            instances = [
                i for i in svc["instances"]
                if (q.status is None or i["status"] == q.status)
                and (q.version is None or i["version"] == q.version)
            ]  # fmt: skip
            if instances:
                out.append({**svc, "instances": instances})
        data, metadata = self._page(out, limit=q.limit, cursor=q.cursor)
        return Answer(data, q.correlation_id, metadata)

    async def _live_service(self, tenant: str, name: str) -> list[dict[str, Any]]:
        """The named service as read_services gives it; NOT_FOUND if it has no live
        instance."""
        services = await read_services(self._redis, tenant, name=name)
        if not services:
            raise QueryError("NOT_FOUND", f"no live service {name!r} in tenant {tenant!r}")
        return services

    async def _service(self, tenant: str, payload: bytes) -> Answer:
        q = parse_query(payload, ServiceQuery)
        await self._await_seq(q.min_seq)
        services = await self._live_service(tenant, q.service_name)
        data, metadata = self._page(services, limit=q.limit, cursor=q.cursor)
        if not data:
            raise QueryError("NOT_FOUND", f"no instances after cursor {q.cursor!r}")
        return Answer(data[0], q.correlation_id, metadata)

    async def _instances(self, tenant: str, payload: bytes) -> Answer:
        """Discovery: a service's instances, filtered; one of them with ``pick``."""
        q = parse_query(payload, InstancesQuery)
        await self._await_seq(q.min_seq)
        services = await self._live_service(tenant, q.service_name)
        found = [
            i for i in services[0]["instances"]
            if (q.version is None or i["version"] == q.version)
            and all(i["metadata"].get(k, _MISSING) == v for k, v in q.metadata.items())
        ]  # fmt: skip
        if q.healthy_only:
            # At-risk instances (critical while the hub doubts itself) come after the
            # healthy ones, marked, rather than vanish: see SelfPreservationStarted.
            found = [i for i in found if is_healthy(i)] + [i for i in found if i["at_risk"]]
        if q.pick is not None:
            return Answer([self._pick(tenant, q, found)], q.correlation_id,
                          {"candidates": len(found), "pick": q.pick})  # fmt: skip
        after = q.cursor
        rows = [i for i in found if after is None or i["instance_id"] > after]
        page = rows[: q.limit]
        next_cursor = page[-1]["instance_id"] if len(rows) > len(page) else None
        return Answer(page, q.correlation_id, {"next_cursor": next_cursor, "total": len(found)})

    def _pick(self, tenant: str, q: InstancesQuery, found: list[dict[str, Any]]) -> dict[str, Any]:
        """One instance by ``q.pick``, preferring instances that are not at risk."""
        candidates = [i for i in found if not i["at_risk"]] or found
        if not candidates:
            raise QueryError("NOT_FOUND", f"no instance of {q.service_name!r} matches")
        candidates.sort(key=lambda i: i["instance_id"])
        if q.pick == "round_robin":
            key = (tenant, q.service_name, str(q.healthy_only), q.version or "",
                   msgspec.json.encode(sorted(q.metadata.items())).decode())  # fmt: skip
            turn = self._round_robin.get(key, 0)
            self._round_robin[key] = turn + 1
            return candidates[turn % len(candidates)]
        if q.pick == "least_load":
            return min(candidates, key=lambda i: (i["load"] is None, i["load"] or 0.0))
        return self._random.choice(candidates)

    async def _health(self, tenant: str, payload: bytes) -> Answer:
        """Per-service and overall health (HEALTHY / DEGRADED / UNHEALTHY)."""
        q = parse_query(payload, HealthQuery)
        await self._await_seq(q.min_seq)
        services = await read_services(self._redis, tenant, name=q.service_name)
        if q.service_name is not None and not services:
            raise QueryError(
                "NOT_FOUND", f"no live service {q.service_name!r} in tenant {tenant!r}"
            )
        rows = []
        for svc in services:
            instances = svc["instances"]
            counts: dict[str, int] = {}
            for i in instances:
                counts[i["status"]] = counts.get(i["status"], 0) + 1
            rows.append({
                "service_name": svc["service_name"], "status": aggregate(instances),
                "instances": len(instances), "by_status": counts,
                "flapping": sum(1 for i in instances if i["flapping"]),
                "at_risk": sum(1 for i in instances if i["at_risk"]),
            })  # fmt: skip
        data = {
            "status": overall([r["status"] for r in rows]),
            "services": rows,
            "self_preservation": await read_preservation(self._redis, tenant),
        }
        return Answer(data, q.correlation_id)

    async def _infrastructure(self, tenant: str, payload: bytes) -> Answer:
        """The monitored infrastructure (shared by all tenants), or one component."""
        del tenant
        q = parse_query(payload, InfrastructureQuery)
        await self._await_seq(q.min_seq)
        components = await read_infrastructure(self._redis)
        if q.component is not None:
            found = [c for c in components if c["name"] == q.component]
            if not found:
                raise QueryError("NOT_FOUND", f"no monitored component {q.component!r}")
            return Answer(found[0], q.correlation_id)
        statuses = [c["status"] for c in components]
        summary = {s: statuses.count(s) for s in sorted(set(statuses))}
        critical_down = [c["name"] for c in components
                         if c["critical"] and c["status"] == "UNHEALTHY"]  # fmt: skip
        data = {"components": components, "by_status": summary, "critical_unhealthy": critical_down}
        return Answer(data, q.correlation_id)

    async def _hub_status(self, tenant: str, payload: bytes) -> Answer:
        """The hub's own health (any tenant may ask): ``HEALTHY`` or ``DEGRADED`` with the
        problems, its role, the event log's writability, the ingress backlog. Answered
        from memory, so it works while the log cannot be written."""
        del tenant
        q = parse_query(payload, StatusQuery)
        if self._status_details is not None:
            data = await self._status_details()
        elif self._status is not None:
            data = self._status.snapshot()
        else:
            data = {"status": "HEALTHY", "problems": []}
        return Answer(data, q.correlation_id)

    def _page(
        self, services: list[dict[str, Any]], *, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One page of at most ``limit`` instances after ``cursor``, shrunk until it fits
        the reply budget; metadata carries ``next_cursor`` and ``total_instances``."""
        after = parse_cursor(cursor)
        rows = [
            (svc, inst)
            for svc in services
            for inst in svc["instances"]
            if after is None or (svc["service_name"], inst["instance_id"]) > after
        ]
        total = sum(len(svc["instances"]) for svc in services)
        while True:
            chosen = rows[:limit]
            data = group_page(chosen)
            if limit == 1 or len(msgspec.json.encode(data)) <= self._reply_budget:
                break
            limit = max(1, limit // 2)
        next_cursor = None
        if len(rows) > len(chosen) and chosen:
            svc, inst = chosen[-1]
            next_cursor = f"{svc['service_name']}/{inst['instance_id']}"
        return data, {"next_cursor": next_cursor, "total_instances": total}


_MISSING = object()


@dataclass(frozen=True)
class Answer:
    """What a view returns: reply data, the request's correlation id, reply metadata."""

    data: Any
    correlation_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def parse_cursor(cursor: str | None) -> tuple[str, str] | None:
    if cursor is None:
        return None
    service, sep, instance = cursor.partition("/")
    if not sep or not is_name(service) or not is_name(instance):
        raise QueryError("INVALID_REQUEST", f"cursor {cursor!r} is not one this hub returned")
    return service, instance


def group_page(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    """Regroup (service, instance) rows into services with their instances."""
    out: list[dict[str, Any]] = []
    for svc, inst in rows:
        if not out or out[-1]["service_name"] != svc["service_name"]:
            out.append({**svc, "instances": []})
        out[-1]["instances"].append(inst)
    return out
