"""The views' projectors in a process of their own, fed with the hub's appends.

The ingest loop and the projectors each need most of a core under heartbeat
volume, and one Python process has one. So the hub starts a child process
(``hub.views_process.main``) that runs ``run_projection`` for every view,
exactly as the hub did in process, with its own connections and its own copy of
the log's tail:

* hub -> child, on the child's stdin: the configuration once, then frames that
  replay the hub's ``LogTail`` calls in order: ``reset`` (the log's end at
  start), ``records`` (each append, with positions and whether the tail can vouch
  for it) and ``gap`` (the hub skipped records: the child was too far behind, or
  not yet running). A ``gap`` sends the child's projectors back to the log, which
  has everything; so does anything else that goes wrong. The log stays the source
  of truth, the pipe only saves the read back.
* child -> hub, on a pipe of its own: each view's applied positions (the hub's
  ``Progress``, hence read-your-writes and ``hub.stop``'s drain) and the
  projectors' counters.

The child ends when its stdin closes (the hub stopped, or died). If the child
dies, the hub starts another one, which reads the log from the views' checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import struct
import time
from collections.abc import Sequence

import msgspec
import structlog

from events.log import LogRecord, Positions
from events.model import AnyEvent
from hub import bootstrap
from hub.children import die_with_parent, spawn_child
from hub.config import HubConfig
from hub.logs import configure, configured
from hub.metrics import Metrics
from hub.progress import Progress
from hub.projector import run_projection
from hub.tail import LogTail

log = structlog.get_logger(__name__)

_HEADER = struct.Struct("<I")
MAX_FRAME = 256 * 1024 * 1024


class ToViews(msgspec.Struct, array_like=True, omit_defaults=True):
    """One frame to the child: a ``LogTail`` call to replay."""

    kind: str  # "reset" | "records" | "gap"
    positions: dict[int, int]
    complete: bool = True
    partitions: list[int] = []
    offsets: list[int] = []
    events: list[AnyEvent] = []


class FromViews(msgspec.Struct, array_like=True, omit_defaults=True):
    """One frame from the child: a view's applied positions, and counters since the last."""

    view: str
    positions: dict[int, int]
    counters: dict[str, int] = {}


_encode = msgspec.msgpack.Encoder().encode
_to_views = msgspec.msgpack.Decoder(ToViews)
_from_views = msgspec.msgpack.Decoder(FromViews)


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload; None at the end of the stream."""
    try:
        head = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    (n,) = _HEADER.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n:,} bytes (at most {MAX_FRAME:,})")
    return await reader.readexactly(n)


def records_frame(records: Sequence[LogRecord], positions: Positions, complete: bool) -> bytes:
    return frame(_encode(ToViews(
        "records", positions, complete,
        [r.partition for r in records], [r.position for r in records],
        [r.event for r in records],
    )))  # fmt: skip


# --- the hub's side -----------------------------------------------------------------------


class ViewsProcess:
    """Starts, feeds and supervises the child that runs the views' projectors.

    It listens to the hub's ``LogTail`` (``forward`` is called synchronously with
    every append). While the child has more than ``max_buffer`` bytes unread (it fell
    behind) or is not running, appends are not sent; the next frame that is sent
    is a ``gap``, so the child's projectors read what they missed from the log.
    """

    def __init__(
        self,
        config: HubConfig,
        tail: LogTail,
        *,
        progress: Progress,
        metrics: Metrics,
        max_buffer: int = 32 * 1024 * 1024,
    ) -> None:
        self._config = config
        self._tail = tail
        tail.listen(self.forward)
        self._progress = progress
        self._metrics = metrics
        self.max_buffer = max_buffer
        self._proc: asyncio.subprocess.Process | None = None
        self._reports: asyncio.StreamReader | None = None
        self._skipped = False  # appends not sent since the last frame (a gap to send)
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the child (the tail's positions are the log's end as read at start)."""
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="views-process")

    async def _spawn(self) -> None:
        # The frames back come on a pipe of their own: the child's stdout is only for
        # what a library might print. (Its Ctrl-C goes to the hub, which lets the views
        # catch up before it closes the child's stdin.)
        proc, reader = await spawn_child("hub.views_process", limit=MAX_FRAME)
        # From here on without a pause: the reset carries the positions appended up to
        # now, every later append follows it (what was skipped before, the child reads
        # from the log anyway).
        assert proc.stdin is not None
        proc.stdin.write(frame(pickle.dumps((self._config, configured()))))
        proc.stdin.write(frame(_encode(ToViews("reset", dict(self._tail.appended)))))
        self._skipped = False
        self._proc, self._reports = proc, reader
        log.info("views_process_started", pid=proc.pid)
        if self._stopping:  # stop() came while this one was being started
            proc.stdin.close()

    def _send(self, data: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(data)

    def _writable(self) -> bool:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return False
        transport = proc.stdin.transport
        return not transport.is_closing() and transport.get_write_buffer_size() < self.max_buffer

    def forward(self, records: list[LogRecord], positions: Positions, complete: bool) -> None:
        """``LogTail`` listener: send one append to the child (or note a gap)."""
        if not self._writable():
            if not self._skipped:
                self._skipped = True
                self._metrics.inc("views_process_gaps")
                self._retry_gap()
            return
        self._send_gap()
        self._send(records_frame(records, positions, complete))

    def _send_gap(self) -> None:
        """If appends were skipped: the positions appended so far, for the child's
        projectors to read from the log (what they have already, they skip)."""
        if self._skipped:
            self._send(frame(_encode(ToViews("gap", dict(self._tail.appended)))))
            self._skipped = False

    def _retry_gap(self) -> None:
        """Send the gap as soon as the child can take it, appends or not (an idle hub
        would otherwise leave the views behind what it skipped)."""
        if not self._skipped or self._stopping:
            return
        if self._writable():
            self._send_gap()
        else:
            asyncio.get_running_loop().call_later(0.05, self._retry_gap)

    async def _supervise(self) -> None:
        """Apply the child's reports; start another child if it dies (or could not be
        started)."""
        delay = 0.5
        while True:
            started = time.monotonic()
            proc, reports = self._proc, self._reports
            if proc is not None and reports is not None:
                await self._read_reports(reports)
                code = await proc.wait()
                if self._stopping:
                    return
                self.restarts += 1
                self._metrics.inc("views_process_restarts")
                log.error("views_process_died_restarting", returncode=code)
            if time.monotonic() - started > 60:
                delay = 0.5
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            if self._stopping:
                return
            try:
                await self._spawn()
            except Exception as exc:  # e.g. no process could be started: try again later
                log.error("views_process_start_failed", error=repr(exc))
                self._proc = self._reports = None

    async def _read_reports(self, reader: asyncio.StreamReader) -> None:
        """Until the child's end of the pipe closes; a report that cannot be read ends
        the child (the supervisor starts another)."""
        while True:
            try:
                payload = await read_frame(reader)
                if payload is None:
                    return
                report = _from_views.decode(payload)
            except (OSError, asyncio.IncompleteReadError, ValueError, msgspec.DecodeError) as exc:
                log.error("views_process_report_unreadable", error=repr(exc))
                if self._proc is not None and self._proc.returncode is None:
                    self._proc.kill()
                return
            for name, n in report.counters.items():
                self._metrics.inc(name, n)
            await self._progress.applied(report.view, report.positions)

    async def stop(self, timeout: float = 10.0) -> None:
        """Close the child's stdin (it stops its projectors and exits); kill it if it
        has not exited within ``timeout`` seconds."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("views_process_killed")
                proc.kill()
                await proc.wait()
        if self._supervisor is not None and not self._supervisor.done():
            # It ends once the child's reports end; it may be asleep before a restart.
            _, pending = await asyncio.wait({self._supervisor}, timeout=5)
            for t in pending:
                t.cancel()


# --- the child ----------------------------------------------------------------------------


class _Reporter:
    """The child's stand-in for ``Progress``: sends each view's applied positions, with the
    counters that changed since the previous report."""

    def __init__(self, out: asyncio.StreamWriter, metrics: Metrics) -> None:
        self._out = out
        self._metrics = metrics
        self._sent: dict[str, int] = {}

    async def applied(self, view: str, positions: Positions) -> None:
        now = self._metrics.counters
        delta = {k: v - self._sent.get(k, 0) for k, v in now.items() if v != self._sent.get(k, 0)}
        self._sent.update({k: now[k] for k in delta})
        self._out.write(frame(_encode(FromViews(view, dict(positions), delta))))
        await self._out.drain()


async def _serve(back_fd: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_FRAME)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", 0)
    )
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(back_fd, "wb", 0)
    )
    out = asyncio.StreamWriter(transport, protocol, None, loop)
    first = await read_frame(reader)
    if first is None:
        return
    config, log_setup = pickle.loads(first)
    if log_setup is not None:
        configure(*log_setup)
    reset = await read_frame(reader)
    if reset is None:
        return
    tail = LogTail()
    tail.reset(_to_views.decode(reset).positions)

    nc = await bootstrap.log_nats(config, "central-hub-views", max_reconnect_attempts=-1)
    pool = await bootstrap.connect_postgres(config)
    r = bootstrap.redis_client(config)
    event_log = bootstrap.make_event_log(config, nc, read_only=True)
    await event_log.start()
    metrics = Metrics()
    reporter = _Reporter(out, metrics)
    stop = asyncio.Event()
    views = bootstrap.view_projections(config, pool, r)
    tasks = []
    for p in views:
        run = run_projection(event_log, p, progress=reporter, metrics=metrics, stop=stop, tail=tail)
        tasks.append(asyncio.create_task(run, name=f"projection:{p.name}"))
    # Each projector subscribes to the tail before its first await; let them, before any
    # append is read (reading buffered frames does not yield). An append read before
    # would reach the projector only from the log, which may no longer hold it whole
    # (superseded heartbeats and check results are rolled up).
    while tail.subscribers < len(tasks) and not any(t.done() for t in tasks):  # noqa: ASYNC110
        await asyncio.sleep(0)  # (one turn is enough; nothing to wait on but the tasks)
    log.info("views_process_serving", views=[t.get_name() for t in tasks])
    try:
        while (payload := await read_frame(reader)) is not None:
            f = _to_views.decode(payload)
            if f.kind == "records":
                tail.publish(
                    [LogRecord(p, o, e) for p, o, e in zip(f.partitions, f.offsets, f.events,
                                                           strict=True)],
                    f.positions, complete=f.complete,
                )  # fmt: skip
            elif f.kind == "gap":
                tail.gap(f.positions)
    finally:
        # The hub closed the pipe after the views caught up (or died): stop, bounded.
        stop.set()
        pending = {t for t in tasks if not t.done()}
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        with contextlib.suppress(Exception):
            await event_log.close()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        await r.aclose()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), 5)
        log.info("views_process_stopped", **metrics.counters)


def main(argv: list[str]) -> int:
    die_with_parent()
    back_fd = int(argv[0])
    # Anything printed goes to stderr; the frames have their own pipe.
    os.dup2(2, 1)
    from hub.gcpause import tune_for_serving

    tune_for_serving()
    try:
        asyncio.run(_serve(back_fd))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the hub is gone
        return 0
    return 0
