"""``hub.query.*`` responders: request-reply over NATS, StandardResponse replies.

Subjects are ``hub.query.<view>`` (tenant ``default``) or
``hub.query.<view>.<tenant>``. Each request is handled in its own task, so a
request waiting for ``min_seq`` never holds up the others.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from events.subjects import QUERY_PREFIX, query_route
from events.wire import (
    ServiceQuery,
    ServicesQuery,
    StandardResponse,
    WireError,
    encode_response,
    parse_query,
)
from hub.config import HubConfig
from hub.metrics import Metrics
from hub.progress import Progress
from projections.redis_read import read_services

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
    ) -> None:
        self._redis = redis
        self._config = config
        self._progress = progress
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Subscription | None = None
        self._views: dict[str, Callable[[str, bytes], Awaitable[tuple[Any, str | None]]]] = {
            "services": self._services,
            "service": self._service,
        }

    async def start(self, nc: Client) -> None:
        self._sub = await nc.subscribe(f"{QUERY_PREFIX}.>", queue="hub-query", cb=self._on_msg)

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
            data, correlation_id = await view(r.tenant, payload)
            response = StandardResponse(success=True, data=data)
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

    async def _services(self, tenant: str, payload: bytes) -> tuple[Any, str | None]:
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
        return out, q.correlation_id

    async def _service(self, tenant: str, payload: bytes) -> tuple[Any, str | None]:
        q = parse_query(payload, ServiceQuery)
        await self._await_seq(q.min_seq)
        services = await read_services(self._redis, tenant, name=q.service_name)
        if not services:
            raise QueryError(
                "NOT_FOUND", f"no live service {q.service_name!r} in tenant {tenant!r}"
            )
        return services[0], q.correlation_id
