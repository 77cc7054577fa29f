"""The hub process: its connections, event log and projections (built by
``hub.bootstrap``), the ingest loop, and the processes it supervises (views, query
servers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import structlog
from nats.aio.client import Client

from events.log import advance, merge_max
from handlers import LivenessPolicy, RegistryState, evolve
from hub import bootstrap
from hub.alerts.rules import load_alerting
from hub.alerts.service import Alerting
from hub.config import HubConfig
from hub.eventlog.port import EventLog
from hub.gcpause import gc_paused, tune_for_serving
from hub.infra.monitor import InfraMonitor, monitored
from hub.ingest import Ingest, ingress_first_seq
from hub.metrics import Metrics
from hub.progress import Progress, ProgressFeed
from hub.query_server import READY_TIMEOUT_S, QueryServers
from hub.status import HubStatus
from hub.supervise import supervise
from hub.tail import LogTail
from hub.views_process import ViewsProcess
from hub.writer import Fenced, Holder, WriterLease
from projections.port import Projection

log = structlog.get_logger(__name__)


async def rebuild_state(
    event_log: EventLog, policy: LivenessPolicy | None = None, *, ingress_first_seq: int = 0
) -> tuple[RegistryState, dict[int, int]]:
    """Fold the whole log into the hub's state; returns it with the log's end.

    ``ingress_first_seq``: the first message still in the ingress stream. Every
    sequence below it was acknowledged, hence recorded; saying so up front keeps
    the ledger small although the log no longer holds superseded heartbeats.
    """
    state = RegistryState(policy=policy or LivenessPolicy())
    # The positions after the last record read, not end_positions(): on Kafka the end
    # offset also counts the transaction's commit marker, which no reader ever passes.
    end: dict[int, int] = {}
    state.ingress.raise_floor(ingress_first_seq)
    count = 0
    with gc_paused():
        async for records in event_log.read(None, follow=False, batch=5000):
            for r in records:
                evolve(state, r.event)
            count += len(records)
            merge_max(end, advance({}, records))
    log.info("state_rebuilt", events=count, ingress_floor=state.ingress.floor,
             ingress_high=state.ingress.high)  # fmt: skip
    return state, end


EXIT_GAVE_UP = 1  # an internal task failed more often than its restart intensity allows
EXIT_FENCED = 3  # another hub is the writer now
# Restarting a failed internal task (hub.supervise): the first backoff and its cap.
RESTART_FIRST_DELAY_S = 0.5
RESTART_MAX_DELAY_S = 30.0


class Hub:
    """The coordinator process.

    ``exit_code`` and ``exit_reason`` say why it stopped by itself: 0 (asked to),
    ``EXIT_GAVE_UP`` or ``EXIT_FENCED``.
    """

    def __init__(
        self,
        config: HubConfig,
        *,
        clock: Callable[[], float] = time.time,
        on_standby: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.on_standby = on_standby
        self.exit_code = 0
        self.exit_reason = ""
        self.status = HubStatus(config.event_log, clock=clock)
        self.lease: WriterLease | None = None
        self.metrics = Metrics()
        self.progress = Progress()
        self.tail = LogTail()  # the ingest loop's appends, handed to the projectors
        self.views: ViewsProcess | None = None  # the process that runs the projectors
        self.nc: Client | None = None
        self.nc_feed: Client | None = None  # the progress feed's own connection, see start()
        self.pool: asyncpg.Pool | None = None
        self.redis: aioredis.Redis | None = None
        self.event_log: EventLog | None = None
        self.ingest: Ingest | None = None
        self.feed: ProgressFeed | None = None  # progress and status for the query servers
        self.query_servers: QueryServers | None = None  # the processes answering hub.query.*
        self.monitor: InfraMonitor | None = None
        self.alerting: Alerting | None = None
        self.projections: list[Projection] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self._stopped = False

    async def start(self) -> None:
        """Connect, rebuild the state from the log, and serve.

        Raises:
            InfraConfigError: the infrastructure file or the alert rules are bad (checked
                before anything is connected, naming the file, the key and the reason).
        """
        c = self.config
        infra = monitored(c)
        rules = load_alerting(os.environ, Path(c.infra_config) if c.infra_config else None)
        self.nc = await bootstrap.connect_nats(
            c, "central-hub", max_reconnect_attempts=-1,
            disconnected_cb=self._nats_disconnected, reconnected_cb=self._nats_reconnected,
        )  # fmt: skip
        self.status.nc = self.nc
        # One writer per ingress stream: wait as a standby while another hub is it.
        self.lease = WriterLease(self.nc, lease_s=c.writer_lease_s)
        if not await self.lease.try_acquire():
            self.status.role = "standby"
            if not await self._standby(self.lease):
                return  # stopped while waiting
        self.status.role = "writer"
        # Renewed from now on: folding a long log at start must not let the lease lapse.
        self._spawn(self.lease.keep(self._stop, also=self._verify_consumer), "writer-lease")
        self.pool = await bootstrap.connect_postgres(c)
        self.redis = bootstrap.redis_client(c)
        await self.redis.ping()
        self.event_log = bootstrap.make_event_log(c, self.nc)
        await self.event_log.start()
        # Set up here (migrations, so that a problem stops the start); the projectors
        # run in a process of their own (hub.views_process).
        self.projections = bootstrap.view_projections(c, self.pool, self.redis)
        for p in self.projections:
            await p.setup()
        first_seq = await ingress_first_seq(self.nc)
        state, end = await rebuild_state(self.event_log, c.liveness, ingress_first_seq=first_seq)
        tune_for_serving()
        self.tail.reset(end)
        self.ingest = Ingest(self.nc, self.event_log, state, c, metrics=self.metrics,
                             progress=self.progress, clock=self.clock, tail=self.tail,
                             status=self.status, lease=self.lease)  # fmt: skip
        await self.ingest.setup()
        # The alert rules are decided on before anything else the loop takes.
        self.alerting = Alerting(c, self.nc, self.ingest, status=self.status,
                                 progress=self.progress, metrics=self.metrics,
                                 views=[p.name for p in self.projections],
                                 clock=self.clock)  # fmt: skip
        self.alerting.load(rules)
        await self.progress.appended(state.ingress.floor, end)
        self.views = ViewsProcess(c, self.tail, progress=self.progress, metrics=self.metrics)
        await self.views.start()
        # hub.query.* is answered by query-server processes, fed with the progress (for
        # min_seq) and the status from here. The feed has a connection of its own: a
        # history request must not queue behind the thousands of ingress messages a
        # fetch brings on the ingest's connection.
        self.nc_feed = await bootstrap.connect_nats(
            c, "central-hub-feed", max_reconnect_attempts=-1
        )
        self.feed = ProgressFeed(self.progress, hub_id=self.lease.me.id, status=self.details,
                                 degraded=self.status.degraded_note)  # fmt: skip
        await self.feed.start(self.nc_feed)
        self.query_servers = QueryServers(c, metrics=self.metrics,
                                          on_restart=self.status.restarted)  # fmt: skip
        await self.query_servers.start()
        ingest = self.ingest
        # Room to isolate one poison message (max_deliver failures on it alone, after
        # its batch failed) before the failures count as the loop's own.
        self._spawn(supervise("ingest", lambda: ingest.run(self._stop), stop=self._stop,
                              recover=self._recover_ingest, on_failure=self.status.restarted,
                              max_restarts=c.max_deliver + 5, first_delay=RESTART_FIRST_DELAY_S,
                              max_delay=RESTART_MAX_DELAY_S), "ingest")  # fmt: skip
        # Started means answering: the query servers subscribed, and each view's
        # projector attached to its view (until then a query of an empty view would wait
        # for it, then answer UNAVAILABLE). Bounded: a view being rebuilt from a long log
        # answers UNAVAILABLE meanwhile, and says so.
        views = [p.name for p in self.projections]
        _, attached = await asyncio.gather(
            self.query_servers.ready(), self.progress.reported(views, READY_TIMEOUT_S)
        )
        if not attached:
            log.warning("views_not_attached_yet", views=views, timeout_s=READY_TIMEOUT_S)
        # The monitor's first results come after: recorded before a view attached, they
        # would make it build itself from the log (UNAVAILABLE meanwhile) at every start.
        self.monitor = InfraMonitor(c, ingest.submit, self.clock, infra=infra,
                                    recorded_digest=lambda: ingest.state.infra.digest)  # fmt: skip
        await self.monitor.start()
        await self.alerting.start()
        log.info("hub_started", event_log=self.event_log.name, nats=list(c.nats_urls),
                 query_servers=self.query_servers.pids)  # fmt: skip

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    async def _standby(self, lease: WriterLease) -> bool:
        """Wait for the writer lease; False if the hub was stopped meanwhile."""

        def waiting(holder: Holder | None) -> None:
            who = holder.describe() if holder is not None else "another hub"
            line = (
                f"another hub is the writer of this ingress: {who}; waiting as a "
                f"standby (taking over {lease.lease_s:g} s after its last renewal)"
            )
            log.warning("hub_standby", holder=who, lease_s=lease.lease_s)
            if self.on_standby is not None:
                self.on_standby(line)

        acquire = asyncio.ensure_future(lease.acquire(waiting))
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not acquire.done():
            acquire.cancel()
            return False
        acquire.result()
        log.info("hub_writer_after_standby")
        if self.on_standby is not None:
            self.on_standby("the writer lease is ours now: serving")
        return True

    async def _verify_consumer(self) -> None:
        if self.ingest is not None:
            await self.ingest.verify_consumer()

    async def _recover_ingest(self) -> None:
        """After the ingest loop failed: the state may hold decisions that were never
        recorded, so fold it from the log again (and check the consumer is still ours)."""
        assert self.ingest is not None and self.event_log is not None and self.nc is not None
        await self.ingest.verify_consumer()
        first_seq = await ingress_first_seq(self.nc)
        state, _ = await rebuild_state(self.event_log, self.config.liveness,
                                       ingress_first_seq=first_seq)  # fmt: skip
        self.ingest.reset(state)

    async def _nats_disconnected(self) -> None:
        if self._stopped:  # our own close
            return
        self.status.nats_disconnected()
        log.warning("nats_disconnected")

    async def _nats_reconnected(self) -> None:
        self.status.nats_reconnected()
        if self.ingest is not None:
            self.ingest.reconnected()
        log.warning("nats_reconnected")

    def details(self) -> dict[str, Any]:
        """The hub's own health, from memory (not the log): sent to the query servers in
        the progress feed, which answer ``hub.query.status`` with it (adding the ingress
        backlog, which they read from JetStream themselves)."""
        out = self.status.snapshot()
        out["pid"] = os.getpid()
        out["ingested_seq"] = self.progress.ingested_seq
        # Each view: caught up with the log, and how often its projector found it lost
        # (wiped, truncated, restarted empty) and rebuilt it from the log.
        out["views"] = {
            p.name: {
                "up_to_date": self.progress.up_to_date(p.name),
                "lost": self.metrics.get(f"view_lost:{p.name}"),
                "rebuilt": self.metrics.get(f"view_rebuilds:{p.name}"),
            }
            for p in self.projections
        }
        out["views_process_restarts"] = self.views.restarts if self.views is not None else 0
        if self.query_servers is not None:
            out["query_servers"] = self.query_servers.describe()
            out["query_server_restarts"] = self.query_servers.restarts
        if self.lease is not None:
            out["writer"] = {"id": self.lease.me.id, "lease_valid": self.lease.valid(),
                             "lease_s": self.lease.lease_s}  # fmt: skip
        if self.ingest is not None:
            out["ingress"] = {
                "recorded_through": self.ingest.state.ingress.high,
                "lease_decisions": "waiting for the backlog"
                if self.ingest.barrier is not None else "on",
            }  # fmt: skip
        return out

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if isinstance(exc, Fenced):
            self.exit_code, self.exit_reason = EXIT_FENCED, f"fenced: {exc}"
            log.error("hub_fenced", task=task.get_name(), reason=str(exc))
        elif not self._stop.is_set():
            self.exit_code, self.exit_reason = EXIT_GAVE_UP, str(exc)
            log.error("hub_task_died", task=task.get_name(), error=repr(exc))
        self._stop.set()

    async def _drain(self, timeout: float) -> None:
        """Wait (bounded) until every projection has applied all that was appended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.progress.up_to_date(p.name) for p in self.projections):
                return
            await asyncio.sleep(0.05)
        log.warning("projections_behind_at_stop")

    async def reload_infra(self) -> bool:
        """Re-read the infrastructure file and the alert rules (SIGHUP); recorded as
        InfraConfigLoaded and AlertRulesLoaded when they changed."""
        infra = self.monitor is not None and await self.monitor.reload()
        alerts = self.alerting is not None and await self.alerting.reload()
        return infra or alerts

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """Stop everything, bounded in time; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self.status.role = "stopping"
        if self.monitor is not None:
            await self.monitor.stop()
        if self.alerting is not None:
            await self.alerting.stop()
        if self.query_servers is not None:
            await self.query_servers.stop()
        if self.feed is not None:
            await self.feed.stop()
        # Graceful: the ingest loop ends at its next turn (nothing more is decided), then
        # the projectors get a moment to apply what was recorded, so the views are not
        # left behind the log.
        ingest = [t for t in self._tasks if t.get_name() == "ingest" and not t.done()]
        if ingest:
            await asyncio.wait(ingest, timeout=5)
        await self._drain(timeout=5)
        if self.lease is not None and self.exit_code != EXIT_FENCED:
            await self.lease.release()  # a standby takes over at once
        if self.views is not None:
            await self.views.stop()
        # Cancel until done: a cancellation can be swallowed inside a client library
        # (see run_projection), so one cancel() is not enough; bounded at 10 s.
        pending = {t for t in self._tasks if not t.done()}
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        for t in pending:
            log.warning("hub_task_did_not_stop", task=t.get_name())
        if self.event_log is not None:
            try:
                await asyncio.wait_for(self.event_log.close(), timeout=10)
            except TimeoutError:
                log.warning("event_log_close_timed_out")
        for nc in (self.nc_feed, self.nc):
            if nc is not None and not nc.is_closed:
                # Everything that reads has been cancelled; flush what was written (acks,
                # replies) and close. (drain() waits out pull subscriptions: 30 s.)
                with contextlib.suppress(Exception):
                    await nc.flush(timeout=2)
                await nc.close()
        if self.redis is not None:
            await self.redis.aclose()
        if self.pool is not None:
            # close() waits for every connection to be released; a connection of a task
            # cancelled mid-query can hold that up indefinitely, so bound it.
            try:
                await asyncio.wait_for(self.pool.close(), timeout=5)
            except TimeoutError:
                log.warning("postgres_pool_close_timed_out")
                self.pool.terminate()
        log.info("hub_stopped")
