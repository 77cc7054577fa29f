"""Query servers: the processes that answer ``hub.query.*``, off the hub's ingest loop.

A query server is stateless: it reads the views (Redis; PostgreSQL for the alert
history, ``hub.query.alerts``), subscribes to
``hub.query.>`` in the queue group ``hub-query`` (so any number of them share the
work, wherever they run), and follows the hub's progress feed
(``hub.progress.ProgressFollower``) for read-your-writes (``min_seq``) and for
``hub.query.status``, which it answers from the hub's latest status snapshot
(DEGRADED, "hub not heard from for N s", once that is older than
``STALE_AFTER_S``) plus the ingress backlog it reads from JetStream itself.

* ``hub run`` starts ``HUB_QUERY_SERVERS`` of them as child processes and
  supervises them as it does the views process (``QueryServers``): one that dies is
  replaced (logged, counted in ``hub.query.status``); each ends when its stdin
  closes (the hub stopped or died).
* ``hub query-server`` runs one alone, configured from the environment like
  ``hub run``, until SIGINT/SIGTERM.

Stopping one gracefully takes it out of the queue group first and answers what it
had accepted. One that is killed loses the requests it had taken: their askers see
their own timeout, and the next requests go to the others (or get "no responders").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import socket
import struct
import time
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import structlog
from nats.aio.client import Client

from events.subjects import INGRESS_CONSUMER, INGRESS_STREAM
from events.vocab import Condition
from hub import bootstrap
from hub.children import die_with_parent, spawn_child
from hub.config import HubConfig
from hub.logs import configure, configured
from hub.metrics import Metrics
from hub.progress import Progress, ProgressFollower
from hub.queries import QueryService

log = structlog.get_logger(__name__)

STALE_AFTER_S = 3.0  # the hub publishes at least every second
BACKLOG_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 60.0


class QueryServer:
    """One query server's connections, progress replica and responders."""

    def __init__(self, config: HubConfig, *, monotonic: Any = time.monotonic) -> None:
        self.config = config
        self._monotonic = monotonic
        self.metrics = Metrics()
        self.progress = Progress()
        self.follower = ProgressFollower(self.progress, monotonic=monotonic)
        self.nc: Client | None = None
        self.redis: aioredis.Redis | None = None
        self.postgres: asyncpg.Pool | None = None
        self.queries: QueryService | None = None
        self.started_at = time.time()

    async def start(self) -> None:
        c = self.config
        self.nc = await bootstrap.connect_nats(
            c, f"central-hub-query-{os.getpid()}", max_reconnect_attempts=-1
        )
        self.redis = bootstrap.query_redis(c)
        self.postgres = await bootstrap.query_postgres(c)
        await self.follower.start(self.nc)
        self.queries = QueryService(self.redis, c, progress=self.progress, metrics=self.metrics,
                                    status_details=self.status,
                                    degraded_note=self.degraded_note,
                                    postgres=self.postgres)  # fmt: skip
        await self.queries.start(self.nc)
        log.info("query_server_started", pid=os.getpid(), hub=self.follower.hub)

    def _stale(self) -> bool:
        return self.follower.heard_at is None or self.follower.silent_s() > STALE_AFTER_S

    def _silence(self) -> str:
        silent = self.follower.silent_s()
        if self.follower.heard_at is None:
            return f"hub not heard from since this query server started {silent:.1f} s ago"
        return f"hub not heard from for {silent:.1f} s"

    def degraded_note(self) -> str | None:
        """Why replies may be stale: the hub's own note, or its silence."""
        if self._stale():
            return f"{self._silence()}: this answer may be stale"
        return self.follower.degraded

    async def status(self) -> dict[str, Any]:
        """``hub.query.status``: the hub's latest snapshot, how old it is, the ingress
        backlog read now, and who answers."""
        out: dict[str, Any] = dict(self.follower.status) or {"role": "unknown"}
        problems = list(out.get("problems", []))
        if self._stale():
            problems.append(self._silence())
        out["problems"] = problems
        out["status"] = Condition.DEGRADED if problems else out.get("status", Condition.HEALTHY)
        out["hub_heard_s_ago"] = (
            round(self.follower.silent_s(), 3) if self.follower.heard_at is not None else None
        )
        out["ingress"] = {**out.get("ingress", {}), **await self._backlog()}
        queries = self.queries
        out["query_server"] = {
            "pid": os.getpid(), "host": socket.gethostname(), "started_at": self.started_at,
            "hub": self.follower.hub, "in_flight": queries.in_flight if queries else 0,
            "working": queries.admission.working if queries else 0,
        }  # fmt: skip
        return out

    async def _backlog(self) -> dict[str, Any]:
        """What waits in ingress (as ``Ingest.backlog`` counts it), from JetStream."""
        assert self.nc is not None
        js = self.nc.jetstream()
        try:
            async with asyncio.timeout(BACKLOG_TIMEOUT_S):
                info = await js.consumer_info(INGRESS_STREAM, INGRESS_CONSUMER)
                stream = await js.stream_info(INGRESS_STREAM)
                oldest_age = 0.0
                if stream.state.messages:
                    first = await js.get_msg(INGRESS_STREAM, seq=stream.state.first_seq, next=True)
                    if first.time is not None:
                        oldest_age = max(0.0, time.time() - first.time.timestamp())
        except Exception as exc:  # the answer says so; the rest of it still holds
            return {"error": repr(exc)}
        return {
            "pending": info.num_pending or 0,
            "ack_pending": info.num_ack_pending or 0,
            "messages": stream.state.messages,
            "oldest_age_s": round(oldest_age, 3),
        }

    async def stop(self) -> None:
        """Leave the queue group, answer what was accepted (bounded), close."""
        if self.queries is not None:
            await self.queries.stop()
        await self.follower.stop()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)
            await self.nc.close()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.redis.aclose(), 2)
        if self.postgres is not None:
            try:
                await asyncio.wait_for(self.postgres.close(), 2)
            except Exception:  # a connection that does not close in time: dropped
                self.postgres.terminate()
        log.info("query_server_stopped", pid=os.getpid(), **self.metrics.snapshot())


async def serve(config: HubConfig) -> int:
    """``hub query-server``: one query server until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = QueryServer(config)
    try:
        await server.start()
        await stop.wait()
    finally:
        await server.stop()
    return 0


# --- started by the hub -----------------------------------------------------------------

_HEADER = struct.Struct("<I")
_READY = b"R"


class QueryServers:
    """The hub's side: starts ``count`` query-server processes and keeps them running.

    Each child gets the configuration on its stdin, says it is ready (subscribed) on a
    pipe of its own, and ends when its stdin closes. One that dies is started again
    after a backoff (0.5 s doubling to 10 s; back to 0.5 s after a minute of life).
    """

    def __init__(
        self,
        config: HubConfig,
        *,
        metrics: Metrics,
        on_restart: Any = None,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._on_restart = on_restart
        self.count = config.query_servers
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._ready: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(self.count)}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        return sorted(p.pid for p in self._procs.values() if p.returncode is None)

    def describe(self) -> dict[str, Any]:
        return {"configured": self.count, "pids": self.pids, "restarts": self.restarts}

    async def start(self) -> None:
        """Start them (``ready`` waits for them to serve)."""
        for slot in range(self.count):
            self._tasks.append(asyncio.create_task(self._keep(slot), name=f"query-server-{slot}"))

    async def ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """Wait until every one serves; False (logged) if that took longer than ``timeout``."""
        waits = [asyncio.ensure_future(e.wait()) for e in self._ready.values()]
        if not waits:
            return True
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for w in pending:
            w.cancel()
        if pending:
            log.warning("query_servers_not_ready", waiting=len(pending), timeout_s=timeout)
        return not pending

    async def _spawn(self) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader]:
        proc, reader = await spawn_child("hub.query_server")
        assert proc.stdin is not None
        payload = pickle.dumps((self._config, configured()))
        proc.stdin.write(_HEADER.pack(len(payload)) + payload)
        return proc, reader

    async def _keep(self, slot: int) -> None:
        delay = 0.5
        while not self._stopping:
            started = time.monotonic()
            try:
                proc, reader = await self._spawn()
            except Exception as exc:  # e.g. no process could be started: try again later
                log.error("query_server_start_failed", error=repr(exc))
            else:
                self._procs[slot] = proc
                if self._stopping:  # stop() came while this one was being started
                    assert proc.stdin is not None
                    proc.stdin.close()
                log.info("query_server_started_by_hub", pid=proc.pid, slot=slot)
                with contextlib.suppress(OSError):
                    if await reader.read(1) == _READY:
                        self._ready[slot].set()
                code = await proc.wait()
                if self._stopping:
                    return
                self.restarts += 1
                self._metrics.inc("query_server_restarts")
                if self._on_restart is not None:
                    self._on_restart("query-server", RuntimeError(
                        f"query server {proc.pid} exited with {code}"))  # fmt: skip
                log.error("query_server_died_restarting", pid=proc.pid, returncode=code,
                          restart_in_s=delay)  # fmt: skip
            if time.monotonic() - started > 60:
                delay = 0.5
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def stop(self, timeout: float = 10.0) -> None:
        """Close every child's stdin (it leaves the queue group, answers what it took and
        exits); kill one that has not exited within ``timeout`` seconds."""
        self._stopping = True
        procs = [p for p in self._procs.values() if p.returncode is None]
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        if procs:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=timeout)
        for proc in procs:
            if proc.returncode is None:
                log.warning("query_server_killed", pid=proc.pid)
                proc.kill()
                await proc.wait()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)


async def _child(back_fd: int) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), os.fdopen(0, "rb", 0))
    try:
        (n,) = _HEADER.unpack(await stdin.readexactly(_HEADER.size))
        config, log_setup = pickle.loads(await stdin.readexactly(n))
    except asyncio.IncompleteReadError:
        return  # the hub went away before saying anything
    if log_setup is not None:
        configure(*log_setup)
    server = QueryServer(config)
    try:
        await server.start()
        with contextlib.suppress(BrokenPipeError):
            os.write(back_fd, _READY)
        while await stdin.read(65536):  # until the hub closes it (or dies)
            pass
    finally:
        await server.stop()


def main(argv: list[str]) -> int:
    die_with_parent()
    back_fd = int(argv[0])
    os.dup2(2, 1)  # anything printed goes to stderr
    from hub.gcpause import tune_for_serving

    tune_for_serving()
    try:
        asyncio.run(_child(back_fd))
    except KeyboardInterrupt:
        return 130
    return 0
