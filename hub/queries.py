"""``hub.query.*`` responders: request-reply over NATS, StandardResponse replies.

They answer from the Redis view, except ``hub.query.alerts`` (the alert history, kept
in PostgreSQL only: ``projections.alert_read``).

Subjects are ``hub.query.<view>`` (tenant ``default``) or
``hub.query.<view>.<tenant>``. Each request is handled in its own task, so a
request waiting for ``min_seq`` never holds up the others. They run in query-server
processes (``hub.query_server``), never on the hub's ingest loop.

Admission and bounded work: a query's work (its reads of the view store and turning
them into the reply) runs on the one core of its process, so k queries working at
once each take about k times their own cost. ``Admission`` lets a query start its
work only while the estimated work of those already working, plus its own, fits
half the query timeout (``HUB_QUERY_TIMEOUT_S``); otherwise, or when
``MAX_IN_FLIGHT`` queries are accepted already or the store's connection pool is
exhausted, it is answered ``BUSY`` at once. A store that does not answer within the
query timeout (counted from the end of any ``min_seq`` wait) is answered
``UNAVAILABLE``, as is one that refuses connections. Neither is ``INTERNAL_ERROR``,
and nothing waits without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import asyncpg
import msgspec
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from events.names import is_name
from events.subjects import QUERY_PREFIX, query_route
from events.vocab import Condition, InfraStatus
from events.wire import (
    AlertsQuery,
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
from projections.alert_read import alert_filter, read_alerts, read_notifications, read_silences
from projections.keys import index_member, split_member
from projections.port import REBUILDING
from projections.redis_read import (
    count_instances,
    health_of,
    instance_json,
    instance_view,
    is_healthy,
    overall,
    read_counts,
    read_index,
    read_infrastructure,
    read_instances,
    read_preservation,
    read_ranks,
    read_service_names,
    read_view_state,
    service_health,
    service_rank,
)

log = structlog.get_logger(__name__)

REDIS_VIEW = "redis-registry"
POSTGRES_VIEW = "postgres-registry"
# PostgreSQL that cannot be reached, is starting or is full (a query timeout is TimeoutError).
_PG_UNREACHABLE = (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
                   asyncpg.TooManyConnectionsError, asyncpg.InterfaceError)  # fmt: skip
# Queries accepted at once (those waiting for min_seq included); more are answered BUSY.
MAX_IN_FLIGHT = 256
# Queries working on the store at once, at most. The store (one Redis thread) serves
# them one command at a time: more at once only queue there, in front of the small
# queries and the projector's writes (16 held register-to-visible at 0.6-1.1 s under
# a storm of pages of 1,000; 4 at 0.1-0.2 s, and answered more of them).
MAX_WORKING = 4
# Cheap queries (and kinds not measured yet) let in beside a full budget, at most: a
# read-your-writes check or a pick is not starved by a storm of big pages.
MAX_FAST = 4


class QueryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PoolExhausted(redis.exceptions.ConnectionError):
    """No connection of the view store's pool became free in time (answered ``BUSY``)."""


def store_error(exc: BaseException, timeout_s: float) -> QueryError | None:
    """The answer to a failure of the view store (None: not one, a bug of ours)."""
    if isinstance(exc, PoolExhausted | redis.exceptions.MaxConnectionsError):
        return QueryError("BUSY", "every connection to the view store is in use, retry")
    if isinstance(exc, redis.exceptions.TimeoutError | TimeoutError):
        return QueryError("UNAVAILABLE", f"the view store did not answer within {timeout_s:g} s")
    if isinstance(exc, redis.exceptions.ConnectionError | OSError):
        return QueryError("UNAVAILABLE", f"the view store cannot be reached: {exc}")
    return None


class Admission:
    """Which queries may work on the view store now: at most ``max_working``, and only
    while the estimated cost of those working plus the newcomer's fits ``budget_s``
    (one query alone is always let in).

    A query that asks for little (``small``: a pick, a page of at most 16), or one of a
    key not measured yet (in half of it), still gets in beside a full budget through a
    lane of ``max_fast`` places: its cost hardly delays the others, and refusing it would
    starve the small queries of a fleet (a discovery pick, a read-your-writes check)
    behind a storm of big pages that retry. (Not by its estimate: a busy moment
    inflates one, and a refused query is never measured again to correct it.)

    A query's own cost is measured as if the working queries shared the core equally
    (processor sharing): ``∫ dt / working`` over its work. Estimates are kept per
    ``key`` (kind of query and tenant) as a peak-EWMA: a dearer measurement counts at
    once, a cheaper one a tenth. A query of a key never measured is estimated at a fair
    share of the budget (``budget_s / max_working``): a storm of a new kind cannot all
    come in before one is measured, and a new kind still gets in beside a storm of
    measured ones (it is not starved until the store falls idle).
    """

    def __init__(
        self,
        *,
        max_working: int = MAX_WORKING,
        max_fast: int = MAX_FAST,
        budget_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        self.max_working = max_working
        self.max_fast = max_fast
        self.budget_s = budget_s
        self.fast = 0  # let in through the lane for cheap queries, working now
        self._clock = clock
        self._max_keys = max_keys
        self.working = 0
        self.load_s = 0.0  # the estimated cost of the queries working now
        self.cost_s: dict[Any, float] = {}
        self._share = 0.0  # the integral of dt / working
        self._at = clock()

    def _advance(self) -> None:
        now = self._clock()
        if self.working:
            self._share += (now - self._at) / self.working
        self._at = now

    def estimate(self, key: Any) -> float:
        return self.cost_s.get(key, self.budget_s / self.max_working)

    def enter(self, key: Any, *, small: bool = False) -> Ticket | None:
        """A ticket to ``leave`` with, or None: refused (answer ``BUSY``). ``small``: the
        query asks for little, so it may take the lane (see the class)."""
        cost = self.estimate(key)
        fast = False
        if self.working and (
            self.working - self.fast >= self.max_working or self.load_s + cost > self.budget_s
        ):
            # Half of the lane at most for kinds not measured yet: the first burst of a
            # big kind must not take the places of the small queries.
            room = self.max_fast if small else self.max_fast // 2
            if self.fast >= room or not (small or key not in self.cost_s):
                return None
            fast = True
            self.fast += 1
        self._advance()
        self.working += 1
        self.load_s += cost
        return Ticket(key, cost, self._share, fast)

    def leave(self, ticket: Ticket, *, measured: bool) -> None:
        key, estimated, share, fast = ticket
        self._advance()
        self.working -= 1
        self.fast -= fast
        self.load_s = max(0.0, self.load_s - estimated) if self.working else 0.0
        if not measured:
            return
        cost = self._share - share
        known = self.cost_s.get(key)
        if known is None and len(self.cost_s) >= self._max_keys:
            self.cost_s.clear()
        self.cost_s[key] = cost if known is None or cost > known else known + (cost - known) / 10


class Ticket(NamedTuple):
    """A query let in by ``Admission.enter``."""

    key: Any
    cost_s: float  # estimated when it came in
    share: float  # the admission's integral of dt / working then
    fast: bool  # through the lane for cheap queries


class _Shape(msgspec.Struct):
    limit: int = 1000
    pick: str | None = None


_shape = msgspec.json.Decoder(_Shape)


# Size classes of queries that ask for little: a pick, a page of at most 16 instances.
SMALL = frozenset({"pick", "1", "4", "16"})


def size_class(payload: bytes) -> str:
    """How much a query asks for, as admission tells costs apart: ``pick`` (one
    instance), or its page's ``limit`` rounded up to a power of 4 (``?`` when it cannot
    be read: the query itself then answers what is wrong)."""
    try:
        shape = _shape.decode(payload) if payload.strip() else _Shape()
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError):
        return "?"  # (deep nesting: the query's own parsing refuses it, with a reason)
    if shape.pick is not None:
        return "pick"
    size = 1
    while size < shape.limit:
        size *= 4
    return str(size)


class _Budget:
    """One query's admission and deadline; paused while it waits for ``min_seq``."""

    def __init__(
        self, admission: Admission, key: Any, timeout_s: float, *, small: bool = False
    ) -> None:
        self._admission = admission
        self._key = key
        self._small = small
        self.timeout_s = timeout_s
        self._deadline: asyncio.Timeout | None = None
        self._token: Ticket | None = None

    def start(self, deadline: asyncio.Timeout) -> None:
        self._deadline = deadline
        self.resume()

    def pause(self) -> None:
        """Waiting costs the store nothing: leave the working ones, stop the clock."""
        if self._token is not None:
            self._admission.leave(self._token, measured=False)
            self._token = None
        if self._deadline is not None:
            self._deadline.reschedule(None)

    def resume(self) -> None:
        """Work again: admitted (or ``BUSY``), the query timeout counts from now."""
        token = self._admission.enter(self._key, small=self._small)
        if token is None:
            raise QueryError("BUSY", "too many queries working on the view store, retry")
        self._token = token
        if self._deadline is not None:
            self._deadline.reschedule(asyncio.get_running_loop().time() + self.timeout_s)

    def finish(self, *, measured: bool) -> None:
        if self._token is not None:
            self._admission.leave(self._token, measured=measured)
            self._token = None


# The budget of the query the current task answers (see QueryService._answer).
_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "query_budget", default=None
)


class QueryService:
    """Answers ``hub.query.*`` from the live views.

    ``status_details``: the answer to ``hub.query.status``; ``degraded_note``: a note
    every reply carries while its data may be stale (None: none); ``postgres``: the pool
    ``hub.query.alerts`` reads with (None: it answers UNAVAILABLE); ``clock``: the time
    silences are judged at.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        config: HubConfig,
        *,
        progress: Progress,
        metrics: Metrics,
        status_details: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        degraded_note: Callable[[], str | None] | None = None,
        admission: Admission | None = None,
        postgres: asyncpg.Pool | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._postgres = postgres
        self._clock = clock
        self._status_details = status_details
        self._degraded_note = degraded_note
        self._config = config
        self._progress = progress
        self._metrics = metrics
        self.admission = admission or Admission(budget_s=config.query_timeout_s / 2)
        self._tasks: set[asyncio.Task[None]] = set()
        self._reply_budget = 1024 * 1024 - 4096
        self._sub: Subscription | None = None
        self._views: dict[str, Callable[[str, bytes], Awaitable[Answer]]] = {
            "services": self._services,
            "service": self._service,
            "instances": self._instances,
            "health": self._health,
            "infrastructure": self._infrastructure,
            "alerts": self._alerts,
            "status": self._hub_status,
        }
        self._round_robin: dict[tuple[str, ...], int] = {}
        self._random = random.Random()

    async def start(self, nc: Client) -> None:
        # Replies must fit the server's max payload; leave room for the envelope.
        self._reply_budget = max(nc.max_payload - 4096, 4096)
        self._sub = await nc.subscribe(f"{QUERY_PREFIX}.>", queue="hub-query", cb=self._on_msg)
        await nc.flush()  # the server knows the subscription before start() returns

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def stop(self, timeout: float = 5.0) -> None:
        """Take no more queries; answer those accepted (bounded), then cancel the rest."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for t in pending:
                t.cancel()

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:
            self._metrics.inc("query_without_reply_subject")
            return
        if len(self._tasks) >= MAX_IN_FLIGHT:
            reply = StandardResponse(success=False, error_code="BUSY",
                                     error_message="too many queries in flight, retry")  # fmt: skip
            self._metrics.inc("query_error:BUSY")
            with contextlib.suppress(Exception):  # the asker went away
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
            answer = await self._answer(r.kind, r.tenant, view, payload)
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
        except Exception as exc:
            error = store_error(exc, self._config.query_timeout_s)
            if error is not None:  # the store is slow, down or busy: say so, keep serving
                log.info("query_store_failed", subject=subject, code=error.code, error=repr(exc))
                response = StandardResponse(success=False, error_code=error.code,
                                            error_message=error.message)  # fmt: skip
                self._metrics.inc(f"query_error:{error.code}")
            else:  # a bug: answer, keep serving
                log.exception("query_failed", subject=subject)
                response = StandardResponse(success=False, error_code="INTERNAL_ERROR",
                                            error_message=type(exc).__name__)  # fmt: skip
                self._metrics.inc("query_error:INTERNAL_ERROR")
        note = self._degraded_note() if self._degraded_note is not None else None
        if note is not None:
            response.metadata = {**response.metadata, "degraded": note}
        response.correlation_id = correlation_id or uuid.uuid4().hex
        response.processing_time_ms = round((time.perf_counter() - started) * 1000, 3)
        return encode_response(response)

    async def _answer(
        self, kind: str, tenant: str, view: Callable[[str, bytes], Awaitable[Answer]],
        payload: bytes,
    ) -> Answer:  # fmt: skip
        """Run ``view`` admitted and under the query timeout (``hub.query.status`` is
        answered from memory: neither)."""
        if kind == "status":
            return await view(tenant, payload)
        timeout_s = self._config.query_timeout_s
        size = size_class(payload)
        budget = _Budget(self.admission, (kind, tenant, size), timeout_s, small=size in SMALL)
        token = _BUDGET.set(budget)
        measured = False
        try:
            async with asyncio.timeout(None) as deadline:
                budget.start(deadline)
                try:
                    answer = await view(tenant, payload)
                except QueryError as exc:  # NOT_FOUND and the like: work done all the same
                    measured = exc.code not in ("BUSY", "UNAVAILABLE")
                    raise
                measured = True
                return answer
        except TimeoutError:
            raise QueryError(
                "UNAVAILABLE", f"the view store did not answer within {timeout_s:g} s"
            ) from None
        finally:
            budget.finish(measured=measured)
            _BUDGET.reset(token)

    async def _await_seq(self, min_seq: int | None, view: str = REDIS_VIEW) -> None:
        if min_seq is None or min_seq == 0:
            return
        if self._progress.reflects(view, min_seq):
            return
        budget = _BUDGET.get()
        if budget is not None:
            budget.pause()
        if not await self._progress.wait(view, min_seq, self._config.min_seq_wait_s):
            raise QueryError(
                "NOT_YET_PROCESSED",
                f"the view does not reflect ingress sequence {min_seq} yet "
                f"(ingested through {self._progress.ingested_seq}); retry",
            )
        if budget is not None:
            budget.resume()

    async def _await_view(self) -> None:
        """UNAVAILABLE while the view cannot be read (being rebuilt, or holding nothing:
        lost, or its projector not started yet), rather than an empty registry. A view
        that holds nothing is waited for up to VIEW_WAIT_S first (a hub that has just
        started; a projector notices a lost view within a second, then says REBUILDING),
        costing the store a read every VIEW_POLL_S meanwhile."""
        found = await read_view_state(self._redis, REDIS_VIEW)
        if found is None:
            return
        budget = _BUDGET.get()
        if budget is not None:
            budget.pause()
        deadline = time.monotonic() + VIEW_WAIT_S
        while found is not None:
            state, reason = found
            if state == REBUILDING or time.monotonic() >= deadline:
                self._metrics.inc(f"query_view_unavailable:{state}")
                raise QueryError("UNAVAILABLE", f"{reason}; retry shortly")
            await asyncio.sleep(VIEW_POLL_S)
            found = await read_view_state(self._redis, REDIS_VIEW)
        if budget is not None:
            budget.resume()

    async def _services(self, tenant: str, payload: bytes) -> Answer:
        """Services with their instances, paged by instance (see ``_page``)."""
        q = parse_query(payload, ServicesQuery)
        await self._await_seq(q.min_seq)
        await self._await_view()
        keep = None
        if q.status is not None or q.version is not None:

            def keep(i: dict[str, Any]) -> bool:
                return (q.status is None or i["status"] == q.status) and (
                    q.version is None or i["version"] == q.version
                )

        rows, after = await self._page(tenant, service=q.name, limit=q.limit,
                                       after=parse_cursor(q.cursor), keep=keep)  # fmt: skip
        data = await self._grouped(tenant, rows)
        total = await count_instances(self._redis, tenant, q.name)
        return Answer(data, q.correlation_id,
                      {"next_cursor": cursor_of(after), "total_instances": total})  # fmt: skip

    async def _live_service(self, tenant: str, name: str) -> int:
        """The named service's live instances (counted); NOT_FOUND if it has none."""
        live = await count_instances(self._redis, tenant, name)
        if not live:
            raise QueryError("NOT_FOUND", f"no live service {name!r} in tenant {tenant!r}")
        return live

    async def _service(self, tenant: str, payload: bytes) -> Answer:
        """One service with its instances, paged like ``hub.query.services``."""
        q = parse_query(payload, ServiceQuery)
        await self._await_seq(q.min_seq)
        await self._await_view()
        total = await self._live_service(tenant, q.service_name)
        rows, after = await self._page(tenant, service=q.service_name, limit=q.limit,
                                       after=parse_cursor(q.cursor))  # fmt: skip
        if not rows:
            raise QueryError("NOT_FOUND", f"no instances after cursor {q.cursor!r}")
        data = await self._grouped(tenant, rows)
        return Answer(data[0], q.correlation_id,
                      {"next_cursor": cursor_of(after), "total_instances": total})  # fmt: skip

    async def _instances(self, tenant: str, payload: bytes) -> Answer:
        """Discovery: a service's instances, filtered and paged by instance id (cursor: the
        last instance id of a page); one of them with ``pick``. ``total``: the service's
        live instances (before the filters)."""
        q = parse_query(payload, InstancesQuery)
        await self._await_seq(q.min_seq)
        await self._await_view()
        total = await self._live_service(tenant, q.service_name)

        def keep(i: dict[str, Any]) -> bool:
            # At-risk instances (critical while the hub doubts itself) stay offered with
            # healthy_only, marked, rather than vanish: see SelfPreservationStarted.
            return (
                (q.version is None or i["version"] == q.version)
                and all(i["metadata"].get(k, _MISSING) == v for k, v in q.metadata.items())
                and (not q.healthy_only or is_healthy(i) or i["at_risk"])
            )

        if q.pick is not None:
            return await self._pick(tenant, q, keep, total)
        filtered = q.version is not None or bool(q.metadata) or q.healthy_only
        after = index_member(q.service_name, q.cursor) if q.cursor is not None else None
        rows, last = await self._page(tenant, service=q.service_name, limit=q.limit, after=after,
                                      keep=keep if filtered else None, grouped=False)  # fmt: skip
        page = [i for _, i in rows]
        if q.healthy_only:  # within the page, the at-risk ones after the healthy ones
            page = [i for i in page if not i["at_risk"]] + [i for i in page if i["at_risk"]]
        next_cursor = split_member(last)[1] if last is not None else None
        return Answer(page, q.correlation_id, {"next_cursor": next_cursor, "total": total})

    async def _pick(
        self, tenant: str, q: InstancesQuery, keep: Callable[[dict[str, Any]], bool], live: int
    ) -> Answer:
        """One instance by ``q.pick`` among those ``keep`` accepts, preferring instances
        that are not at risk; bounded: at most PICK_WINDOW instances are examined.

        * ``round_robin``: the next accepted instance (in instance id order) after the one
          picked last time for the same query;
        * ``random``: up to RANDOM_PROBES instances drawn at random, the first accepted
          one taken (uniform over the accepted, not at risk); failing that, one drawn among
          those accepted in a window from a random place;
        * ``least_load``: the least loaded accepted instance of a window from a random
          place (all of the service's when it has at most PICK_WINDOW).

        Metadata: ``examined`` instances, of which ``candidates`` were accepted.
        """
        preserving = await read_preservation(self._redis, tenant) is not None
        first = await service_rank(self._redis, tenant, q.service_name)
        window = min(live, PICK_WINDOW)
        examined = 0
        seen: list[tuple[int, dict[str, Any]]] = []

        def answer(inst: dict[str, Any]) -> Answer:
            return Answer([inst], q.correlation_id,
                          {"candidates": len(seen), "examined": examined,
                           "pick": q.pick})  # fmt: skip

        if q.pick == "round_robin":
            key = (tenant, q.service_name, str(q.healthy_only), q.version or "",
                   msgspec.json.encode(sorted(q.metadata.items())).decode())  # fmt: skip
            start = (self._round_robin.get(key, -1) + 1) % live
            async for offset, inst in self._window(tenant, q.service_name, first, live, start,
                                                   window, preserving):  # fmt: skip
                examined += 1
                if keep(inst):
                    seen.append((offset, inst))
                    if not inst["at_risk"]:
                        self._round_robin[key] = offset
                        return answer(inst)
            if seen:
                self._round_robin[key] = seen[0][0]
                return answer(seen[0][1])
            raise QueryError("NOT_FOUND", f"no instance of {q.service_name!r} matches")
        if q.pick == "random":
            for _ in range(min(RANDOM_PROBES, live)):
                start = self._random.randrange(live)
                async for offset, inst in self._window(tenant, q.service_name, first, live,
                                                       start, 1, preserving):  # fmt: skip
                    examined += 1
                    if keep(inst) and not inst["at_risk"]:
                        seen.append((offset, inst))
                        return answer(inst)
        start = self._random.randrange(live)
        async for offset, inst in self._window(tenant, q.service_name, first, live, start,
                                               window, preserving):  # fmt: skip
            examined += 1
            if keep(inst):
                seen.append((offset, inst))
        candidates = [i for _, i in seen if not i["at_risk"]] or [i for _, i in seen]
        if not candidates:
            raise QueryError("NOT_FOUND", f"no instance of {q.service_name!r} matches")
        if q.pick == "least_load":
            candidates.sort(key=lambda i: i["instance_id"])
            return answer(min(candidates, key=lambda i: (i["load"] is None, i["load"] or 0.0)))
        return answer(self._random.choice(candidates))

    async def _window(
        self, tenant: str, service: str, first: int, live: int, start: int, count: int,
        preserving: bool,
    ) -> AsyncIterator[tuple[int, dict[str, Any]]]:  # fmt: skip
        """``count`` of the service's instances from the ``start``-th (wrapping round),
        with their offsets in the service, read a few at a time (``first``: the rank of
        the service's first instance in the index, ``live`` its number of instances; an
        instance gone since, or of another service since the ranks shifted, is left out)."""
        done, chunk = 0, 8
        while done < count:
            k = min(chunk, count - done)
            at = (start + done) % live
            ranges = [(first + at, first + min(at + k, live) - 1)]
            if at + k > live:
                ranges.append((first, first + at + k - live - 1))
            members = await read_ranks(self._redis, tenant, ranges)
            hashes = await read_instances(self._redis, tenant, members)
            for j, (m, h) in enumerate(zip(members, hashes, strict=True)):
                if h and split_member(m)[0] == service:
                    yield (at + j) % live, instance_view(h, preserving=preserving)
            done += k
            chunk = min(chunk * 4, 256)

    async def _health(self, tenant: str, payload: bytes) -> Answer:
        """Per-service and overall health (HEALTHY / DEGRADED / UNHEALTHY), from the
        counts the projection keeps per service: one small read per service, whatever
        the number of instances."""
        q = parse_query(payload, HealthQuery)
        await self._await_seq(q.min_seq)
        await self._await_view()
        preservation = await read_preservation(self._redis, tenant)
        if q.service_name is not None:
            names = [q.service_name]
        else:
            names = await read_service_names(self._redis, tenant)
        counts = await read_counts(self._redis, tenant, names)
        rows = [service_health(n, c, preserving=preservation is not None)
                for n, c in zip(names, counts, strict=True) if c]  # fmt: skip
        if q.service_name is not None and not rows:
            raise QueryError(
                "NOT_FOUND", f"no live service {q.service_name!r} in tenant {tenant!r}"
            )
        data = {
            "status": overall([r["status"] for r in rows]),
            "services": rows,
            "self_preservation": preservation,
        }
        return Answer(data, q.correlation_id)

    async def _infrastructure(self, tenant: str, payload: bytes) -> Answer:
        """The monitored infrastructure (shared by all tenants), or one component."""
        del tenant
        q = parse_query(payload, InfrastructureQuery)
        await self._await_seq(q.min_seq)
        await self._await_view()
        components = await read_infrastructure(self._redis)
        if q.component is not None:
            found = [c for c in components if c["name"] == q.component]
            if not found:
                raise QueryError("NOT_FOUND", f"no monitored component {q.component!r}")
            return Answer(found[0], q.correlation_id)
        statuses = [c["status"] for c in components]
        summary = {s: statuses.count(s) for s in sorted(set(statuses))}
        critical_down = [c["name"] for c in components
                         if c["critical"] and c["status"] == InfraStatus.UNHEALTHY]  # fmt: skip
        data = {"components": components, "by_status": summary, "critical_unhealthy": critical_down}
        return Answer(data, q.correlation_id)

    async def _alerts(self, tenant: str, payload: bytes) -> Answer:
        """The alert history (PostgreSQL): the tenant's alerts (and the shared ones), its
        notifications, or the silences (``include``), newest first; metadata ``count``
        and ``more`` (more match than the ``limit``, or than one answer examines)."""
        q = parse_query(payload, AlertsQuery)
        wanted = alert_filter(q)
        await self._await_seq(q.min_seq, POSTGRES_VIEW)
        if self._postgres is None:
            raise QueryError("UNAVAILABLE", "this query server reads no PostgreSQL view")
        try:
            async with self._postgres.acquire() as conn:
                now = self._clock()
                if wanted.include == "notifications":
                    data, more = await read_notifications(conn, tenant, wanted)
                elif wanted.include == "silences":
                    data, more = await read_silences(conn, tenant, wanted, now)
                else:
                    data, more = await read_alerts(conn, tenant, wanted, now)
        except asyncpg.UndefinedTableError:
            raise QueryError(
                "UNAVAILABLE",
                "the alert tables are not created yet (the views"
                " process creates them as it starts); retry shortly",
            ) from None
        except _PG_UNREACHABLE as exc:
            raise QueryError("UNAVAILABLE", f"the alert history cannot be read: {exc}") from None
        return Answer(data, q.correlation_id, {"count": len(data), "more": more,
                                               "include": wanted.include})  # fmt: skip

    async def _hub_status(self, tenant: str, payload: bytes) -> Answer:
        """The hub's own health (any tenant may ask): ``HEALTHY`` or ``DEGRADED`` with the
        problems, its role, the event log's writability, the ingress backlog. Answered
        from memory, so it works while the log cannot be written."""
        del tenant
        q = parse_query(payload, StatusQuery)
        if self._status_details is not None:
            data = await self._status_details()
        else:
            data = {"status": Condition.HEALTHY, "problems": []}
        return Answer(data, q.correlation_id)

    async def _page(
        self, tenant: str, *, service: str | None, limit: int, after: str | None,
        keep: Callable[[dict[str, Any]], bool] | None = None, grouped: bool = True,
    ) -> tuple[list[tuple[str, Any]], str | None]:  # fmt: skip
        """One page: the tenant's instances (only ``service``'s if given) in (service,
        instance) order after the index member ``after``, those ``keep`` accepts; returns
        them as (service name, instance) rows, and the member the next page starts after
        (None: nothing is left).

        Its cost follows the page, not the tenant: the index is read from the cursor on,
        a chunk at a time, with each instance. A page ends at ``limit`` instances, at the
        reply budget (bytes: NATS' max payload less room for the envelope; ``grouped``:
        counting the services' own fields), or after SCAN_BUDGET instances were
        examined: with filters, a page may then come back short (even empty) with a
        ``next_cursor``; follow it to go on.
        """
        preserving = await read_preservation(self._redis, tenant) is not None
        rows: list[tuple[str, dict[str, Any]]] = []
        size, group, scanned, pos = 2, None, 0, after
        while True:
            want = limit - len(rows)
            n = min(SCAN_BUDGET - scanned, want if keep is None else max(want, SCAN_CHUNK))
            members = await read_index(self._redis, tenant, after=pos, service=service,
                                       count=n + 1)  # fmt: skip
            hashes = await read_instances(self._redis, tenant, members[:n])
            for i, (m, h) in enumerate(zip(members, hashes, strict=False)):
                scanned += 1
                if h:
                    inst: Any
                    if keep is None:  # answered as read: the doc is not parsed
                        inst = instance_json(h, preserving=preserving)
                        cost = len(inst) + 1
                    else:
                        inst = instance_view(h, preserving=preserving)
                        cost = len(_encode_json(inst)) + 1
                    if keep is None or keep(inst):
                        svc = split_member(m)[0]
                        if grouped and svc != group:
                            cost += len(svc) + GROUP_BYTES
                        if rows and size + cost > self._reply_budget:
                            return rows, pos  # this one opens the next page
                        rows.append((svc, inst))
                        size, group = size + cost, svc
                pos = m
                if len(rows) == limit:
                    return rows, pos if i + 1 < len(members) else None
            if len(members) <= n:
                return rows, None
            if scanned >= SCAN_BUDGET:
                return rows, pos

    async def _grouped(
        self, tenant: str, rows: list[tuple[str, dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """Rows regrouped into services, each with its health over all its instances
        (from the projection's counts)."""
        names = sorted({svc for svc, _ in rows})
        counts = await read_counts(self._redis, tenant, names)
        statuses = {n: health_of(c).lower() for n, c in zip(names, counts, strict=True)}
        return group_page(rows, statuses)


# Instances one query examines at most (filters); a page may end short, with a cursor.
SCAN_BUDGET = 5_000
SCAN_CHUNK = 500  # index members read at once while filtering
# What a service adds to a page around its instances: {"service_name":"","status":
# "unhealthy","instances":[]} and a comma, rounded up.
GROUP_BYTES = 64
PICK_WINDOW = 1_000  # instances one pick examines at most
RANDOM_PROBES = 8  # random draws before a random pick examines a window
VIEW_WAIT_S = 3.0  # how long a query waits for a view that holds nothing
VIEW_POLL_S = 0.05
_MISSING = object()
_encode_json = msgspec.json.encode


@dataclass(frozen=True)
class Answer:
    """What a view returns: reply data, the request's correlation id, reply metadata."""

    data: Any
    correlation_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def parse_cursor(cursor: str | None) -> str | None:
    """The index member after which a page starts, from a ``service/instance`` cursor."""
    if cursor is None:
        return None
    service, sep, instance = cursor.partition("/")
    if not sep or not is_name(service) or not is_name(instance):
        raise QueryError("INVALID_REQUEST", f"cursor {cursor!r} is not one this hub returned")
    return index_member(service, instance)


def cursor_of(member: str | None) -> str | None:
    """The ``service/instance`` cursor of an index member."""
    if member is None:
        return None
    return "/".join(split_member(member))


def group_page(
    rows: list[tuple[str, dict[str, Any]]], statuses: dict[str, str]
) -> list[dict[str, Any]]:
    """Regroup (service name, instance) rows into services with their instances."""
    out: list[dict[str, Any]] = []
    for svc, inst in rows:
        if not out or out[-1]["service_name"] != svc:
            status = statuses.get(svc, Condition.UNHEALTHY.lower())  # as _grouped spells it
            out.append({"service_name": svc, "status": status, "instances": []})
        out[-1]["instances"].append(inst)
    return out
