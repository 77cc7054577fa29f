"""Ingest benchmark: heartbeats/s from the ingress stream to the Redis view, against a plain
JetStream pull consumer.

Run from the project root::

    .venv/bin/python -m bench.ingest                        # 10,000 instances, 100,000 heartbeats
    .venv/bin/python -m bench.ingest --heartbeats 20000     # quick run
    .venv/bin/python -m bench.ingest --log kafka            # Kafka event log (starts Kafka too)
    .venv/bin/python -m bench.ingest --profile              # plus cProfile of the hub's phase

It starts the embedded stack (NATS+JetStream, PostgreSQL, Valkey; Kafka with ``--log kafka``)
and a hub in this process (whose views' projectors run in the child process the hub starts,
``hub.views_process``, as in production), registers ``--instances`` instances and waits until
the Redis view holds them all. Then the hub is stopped (its ingress stream keeps what is
published meanwhile) and, per round:

* **raw** (the limit of the layer below, same run): ``--heartbeats`` messages of the same
  shape and size are published to a separate stream (``BENCH_RAW`` on ``bench.raw.heartbeat``,
  configured like the hub's ingress stream: file storage, work-queue retention) and a plain
  nats-py pull consumer (the hub's consumer settings) fetches them in batches of
  ``ingest_batch`` and acknowledges each message: the least any ingest must do. Timed from
  the first fetch to the last ack flushed.
* **hub**: the same heartbeats are published to ``hub.heartbeat`` while the hub is stopped;
  then a new ``Hub`` is started on the same servers and timed until its Redis view reflects
  the last heartbeat (``hub.progress``: the view's applied log position covers the batch that
  recorded that ingress sequence). Reported with startup (state rebuilt from the log:
  every registration) and without it (from ``start()`` returning; the ingest task already
  runs during the end of ``start()``, so the count done by then is printed too).

**ratio** = hub heartbeats/s excluding startup / raw consume rate; target >= 50 %. After each
hub phase the Redis view is checked: every instance present, every ``last_seen`` at or after
the phase's first publish, one ``HeartbeatReceived`` recorded per heartbeat and no rejection.
Exit code 0 whether the target is met or not; 2 when the benchmark could not measure (a
timeout or a failed sanity check).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import logging
import os
import pstats
import statistics
import sys
import time
from dataclasses import dataclass

import msgspec
import nats
import nats.js.errors
import redis.asyncio as aioredis
from nats.aio.client import Client

from bench._scratch import scratch_root
from events.vocab import Health
from hub.app import Hub
from hub.bootstrap import redis_client
from hub.config import HubConfig
from hub.ingest import ingress_consumer_config, ingress_stream_config
from hub.logs import configure
from hub.stack import EmbeddedStack
from projections.keys import instance_key, service_key

TARGET = 0.50  # the hub must reach this fraction of the raw consume rate
TENANT = "default"
SERVICES = tuple(f"svc-{i:02d}" for i in range(20))
RAW_STREAM = "BENCH_RAW"
RAW_SUBJECT = "bench.raw.heartbeat"
RAW_CONSUMER = "bench-raw"
WINDOW = 2000  # publishes in flight
REDIS_VIEW = "redis-registry"
POSTGRES_VIEW = "postgres-registry"
_encode = msgspec.json.Encoder().encode


def instance(i: int) -> tuple[str, str]:
    return SERVICES[i % len(SERVICES)], f"inst-{i:05d}"


def heartbeat_payloads(n_heartbeats: int, n_instances: int) -> list[bytes]:
    """``n_heartbeats`` wire heartbeats, round robin over the instances (mixed load)."""
    out = []
    for k in range(n_heartbeats):
        service, inst = instance(k % n_instances)
        out.append(
            _encode(
                {
                    "service_name": service,
                    "instance_id": inst,
                    "status": Health.HEALTHY,
                    "load": round((k * 37 % 1000) / 1000, 3),
                }
            )
        )
    return out


async def publish_all(nc: Client, subject: str, payloads: list[bytes]) -> tuple[int, float]:
    """Publish with ``publish_async``, ``WINDOW`` in flight; returns (last seq, seconds)."""
    js = nc.jetstream()
    last = 0
    t0 = time.perf_counter()
    pending: list[asyncio.Future[object]] = []
    for data in payloads:
        pending.append(await js.publish_async(subject, data))  # type: ignore[arg-type]
        if len(pending) >= WINDOW:
            last = max(last, *(a.seq for a in await asyncio.gather(*pending)))  # type: ignore[attr-defined]
            pending = []
    if pending:
        last = max(last, *(a.seq for a in await asyncio.gather(*pending)))  # type: ignore[attr-defined]
    return last, time.perf_counter() - t0


# --- raw: a plain pull consumer ------------------------------------------------------------


async def setup_raw(nc: Client, config: HubConfig) -> None:
    js = nc.jetstream()
    # Configured exactly like the hub's ingress stream and consumer, under other names.
    stream = dataclasses.replace(
        ingress_stream_config(config), name=RAW_STREAM, subjects=[RAW_SUBJECT]
    )
    await js.add_stream(stream)
    await js.add_consumer(
        RAW_STREAM, dataclasses.replace(ingress_consumer_config(), durable_name=RAW_CONSUMER)
    )


async def raw_consume(url: str, n: int, batch: int) -> tuple[float, float]:
    """Fetch and ack ``n`` messages from ``BENCH_RAW`` the way the hub's ingest loop does
    (the next batch fetched while this one is acknowledged); returns (seconds, CPU share
    of one core)."""
    nc = await nats.connect(url, name="bench-raw-consumer")
    try:
        sub = await nc.jetstream().pull_subscribe_bind(RAW_CONSUMER, stream=RAW_STREAM)
        count = 0
        t0, c0 = time.perf_counter(), time.process_time()
        pending = asyncio.create_task(sub.fetch(batch, timeout=5.0))
        while count < n:
            try:
                msgs = await pending
            except (TimeoutError, nats.errors.TimeoutError):
                raise RuntimeError(f"raw consumer stalled at {count:,}/{n:,}") from None
            count += len(msgs)
            if count < n:
                pending = asyncio.create_task(sub.fetch(batch, timeout=5.0))
            for m in msgs:
                await m.ack()
        await nc.flush()
        t1, c1 = time.perf_counter(), time.process_time()
        return t1 - t0, (c1 - c0) / (t1 - t0)
    finally:
        await nc.close()


# --- the hub -------------------------------------------------------------------------------


async def register_all(nc: Client, hub: Hub, n: int) -> float:
    """Register ``n`` instances and wait until the Redis view holds them; returns seconds."""
    payloads = []
    for i in range(n):
        service, inst = instance(i)
        payloads.append(
            _encode(
                {
                    "service_name": service,
                    "instance_id": inst,
                    "host": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
                    "port": 8000 + i % 1000,
                    # No lease may lapse, nothing may expire during the run.
                    "heartbeat_interval_s": 600.0,
                    "ttl_s": 3600.0,
                    "expire_after_s": 24 * 3600.0,
                }
            )
        )
    t0 = time.perf_counter()
    last, _ = await publish_all(nc, "hub.register", payloads)
    if not await hub.progress.wait(REDIS_VIEW, last, timeout=max(60.0, n / 200)):
        raise RuntimeError("the Redis view did not reflect the registrations in time")
    return time.perf_counter() - t0


async def view_members(r: aioredis.Redis) -> int:
    async with r.pipeline(transaction=False) as pipe:
        for s in SERVICES:
            pipe.scard(service_key(TENANT, s))
        return sum(await pipe.execute())


async def stale_last_seen(r: aioredis.Redis, n: int, since: float) -> int:
    """Instances whose Redis ``last_seen`` is missing or before ``since``."""
    async with r.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.hget(instance_key(TENANT, *instance(i)), "last_seen")
        values = await pipe.execute()
    return sum(1 for v in values if v is None or float(v) < since)


@dataclass
class HubRun:
    startup_s: float  # Hub() + start()
    recorded_s: float  # start() returned -> the last heartbeat is in the event log
    visible_s: float  # start() returned -> Redis view reflects the last heartbeat
    postgres_s: float  # start() returned -> PostgreSQL view reflects it too
    cpu_share: float  # this process's CPU time / wall time while ingesting (1.0 = one core)
    views_cpu_share: float  # the same for the hub's views process (hub.views_process)
    done_at_start: int  # heartbeats already recorded when start() returned
    query_ms: list[float]  # round trips of hub.query.infrastructure while ingesting
    counters: dict[str, int]
    problems: list[str]


async def hub_phase(
    config: HubConfig,
    nc: Client,
    r: aioredis.Redis,
    payloads: list[bytes],
    n_instances: int,
    prof: cProfile.Profile | None,
) -> HubRun:
    n = len(payloads)
    since = time.time() - 0.05
    last, pub_s = await publish_all(nc, "hub.heartbeat", payloads)
    print(
        f"  published {n:,} to hub.heartbeat in {pub_s:.2f} s ({n / pub_s:,.0f}/s; the hub "
        "is stopped)",
        flush=True,
    )
    timeout = max(120.0, n / 500)
    hub = Hub(config)
    recorded = asyncio.create_task(_when_recorded(hub, last))
    probing = asyncio.Event()
    query_ms: list[float] = []
    probe = asyncio.create_task(_probe_queries(nc, probing, query_ms))
    if prof is not None:
        prof.enable()
    try:
        t0 = time.perf_counter()
        await hub.start()
        t1, c1 = time.perf_counter(), time.process_time()
        probing.set()
        views_pid = hub.views.pid if hub.views is not None else None
        v1 = process_cpu(views_pid)
        done_at_start = hub.metrics.get("ingress_HeartbeatReceived")
        if not await hub.progress.wait(REDIS_VIEW, last, timeout=timeout):
            raise RuntimeError(
                f"the Redis view did not reflect the last heartbeat within {timeout:.0f} s "
                f"({hub.metrics.get('ingress_HeartbeatReceived'):,}/{n:,} ingested)"
            )
        t2, c2 = time.perf_counter(), time.process_time()
        probing.clear()
        v2 = process_cpu(views_pid)
        if prof is not None:
            prof.disable()
        pg_ok = await hub.progress.wait(POSTGRES_VIEW, last, timeout=timeout)
        t3 = time.perf_counter()
        counters = hub.metrics.snapshot()
    finally:
        if prof is not None:
            prof.disable()
        recorded.cancel()
        probe.cancel()
        await hub.stop()
    t_log = recorded.result() if recorded.done() and not recorded.cancelled() else t3
    problems = []
    if not pg_ok:
        problems.append(f"PostgreSQL view did not reflect the last heartbeat in {timeout:.0f} s")
    got = counters.get("ingress_HeartbeatReceived", 0)
    if got != n:
        problems.append(f"HeartbeatReceived recorded {got:,}, expected {n:,}")
    if rejected := counters.get("ingress_rejected", 0):
        problems.append(f"{rejected:,} heartbeats rejected")
    if (members := await view_members(r)) != n_instances:
        problems.append(f"Redis view holds {members:,} instances, expected {n_instances:,}")
    if stale := await stale_last_seen(r, min(n, n_instances), since):
        problems.append(f"{stale:,} instances' Redis last_seen is before this phase")
    cpu = (c2 - c1) / (t2 - t1)
    views_cpu = (v2 - v1) / (t2 - t1)
    return HubRun(t1 - t0, t_log - t1, t2 - t1, t3 - t1, cpu, views_cpu, done_at_start,
                  query_ms, counters, problems)  # fmt: skip


async def _probe_queries(nc: Client, probing: asyncio.Event, out: list[float]) -> None:
    """While ``probing`` is set, ask ``hub.query.infrastructure`` every 20 ms (a small
    answer: what is measured is how long a query waits behind the ingest's batches)."""
    while True:
        await probing.wait()
        t = time.perf_counter()
        try:
            await nc.request("hub.query.infrastructure", b"{}", timeout=5.0)
        except nats.errors.TimeoutError:
            out.append(5000.0)
        else:
            out.append((time.perf_counter() - t) * 1000)
        await asyncio.sleep(0.02)


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of another process so far (Linux /proc; 0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _when_recorded(hub: Hub, last: int) -> float:
    """When the ingest loop has recorded ingress up to ``last`` in the event log (polled:
    ``Progress`` offers no wait for that, and 10 ms is fine grained enough here)."""
    while hub.progress.ingested_seq < last:  # noqa: ASYNC110 (nothing to wait on)
        await asyncio.sleep(0.01)
    return time.perf_counter()


# Where the hub's time goes, by part: (label, file path ending, function).
PARTS = (
    ("ingest loop: Ingest.process (decide, append, ack)", "hub/ingest.py", "process"),
    ("  of which the event log append", "hub/eventlog/jetstream.py", "append"),
    ("  of which the event log append", "hub/eventlog/kafka.py", "append"),
    ("  of which handing the appends to the views process", "hub/views_process.py", "forward"),
    ("nats-py read loop (parse, dispatch)", "nats/aio/client.py", "_read_loop"),
)


def _components(prof: cProfile.Profile, wall_s: float) -> str:
    """Cumulative time of the hub's parts (a coroutine counts only while it runs)."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    lines = [f"by part (profiled wall time {wall_s:.2f} s; the profiler slows everything):"]
    for label, path, func in PARTS:
        ct = sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(path) and fn == func)
        if ct:
            lines.append(f"  {label:<52} {ct:7.2f} s  {ct / wall_s:5.0%}")
    return "\n".join(lines)


def _top(prof: cProfile.Profile, sort: str, n: int = 25) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats(sort).print_stats(n)
    lines = buf.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(lines[start : start + n + 1])


# --- main ----------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, stack: EmbeddedStack) -> int:
    config = HubConfig.from_env(stack.env())
    config = dataclasses.replace(config, ingest_batch=args.batch)
    n, m = args.heartbeats, args.instances
    r = redis_client(config)
    nc = await nats.connect(stack.nats.url, name="bench-publisher")
    try:
        hub = Hub(config)
        await hub.start()
        try:
            print(f"registering {m:,} instances ...", flush=True)
            reg_s = await register_all(nc, hub, m)
        finally:
            await hub.stop()
        members = await view_members(r)
        print(f"  in the Redis view after {reg_s:.1f} s: {members:,} instances", flush=True)
        if members != m:
            print(f"SANITY CHECK FAILED: expected {m:,} instances in the Redis view")
            return 2
        await setup_raw(nc, config)
        payloads = heartbeat_payloads(n, m)
        size = statistics.mean(len(p) for p in payloads)
        print(f"{n:,} heartbeats, {size:.0f} bytes each on average, {n // m} per instance\n")

        raw_rates, hub_rates, with_start, pg_rates, runs = [], [], [], [], []
        failures: list[str] = []
        for round_ in range(1, args.rounds + 1):
            _, pub_s = await publish_all(nc, RAW_SUBJECT, payloads)
            print(
                f"round {round_}  published {n:,} to {RAW_SUBJECT} in {pub_s:.2f} s "
                f"({n / pub_s:,.0f}/s)",
                flush=True,
            )
            raw_s, raw_cpu = await raw_consume(stack.nats.url, n, config.ingest_batch)
            raw_rates.append(n / raw_s)
            print(
                f"round {round_}  raw pull consumer (fetch {config.ingest_batch}, ack each): "
                f"{n:,} in {raw_s:6.2f} s = {n / raw_s:>9,.0f} msg/s; it used {raw_cpu:.0%} "
                "of one core",
                flush=True,
            )
            prof = cProfile.Profile() if args.profile and round_ == args.rounds else None
            run = await hub_phase(config, nc, r, payloads, m, prof)
            runs.append(run)
            total = run.startup_s + run.visible_s
            hub_rates.append(n / run.visible_s)
            with_start.append(n / total)
            pg_rates.append(n / run.postgres_s)
            print(
                f"round {round_}  hub ingest -> Redis view: {n:,} in {run.visible_s:6.2f} s = "
                f"{n / run.visible_s:>9,.0f} hb/s excluding startup ({run.done_at_start:,} "
                f"already done when start() returned); with startup {run.startup_s:.2f} s: "
                f"{total:.2f} s = {n / total:,.0f} hb/s\n"
                f"          of which: recorded in the event log after {run.recorded_s:.2f} s "
                f"({n / run.recorded_s:,.0f} hb/s), PostgreSQL view after {run.postgres_s:.2f} s;"
                f" the hub process used {run.cpu_share:.0%} of one core, its views process "
                f"{run.views_cpu_share:.0%}",
                flush=True,
            )
            q = sorted(run.query_ms)
            if q:
                print(
                    f"          hub.query.infrastructure meanwhile ({len(q)} queries): median "
                    f"{statistics.median(q):.1f} ms, p99 {q[int(len(q) * 0.99)]:.1f} ms, worst "
                    f"{q[-1]:.1f} ms",
                    flush=True,
                )
            failures += [f"round {round_}: {p}" for p in run.problems]
            if prof is not None:
                print("\n== cProfile of the hub phase (start + ingest until Redis reflects) ==")
                print(_components(prof, run.startup_s + run.visible_s))
                print("top functions by own time:")
                print(_top(prof, "tottime"))
                print("\ntop functions by cumulative time:")
                print(_top(prof, "cumulative", 30))
                print()

        raw = statistics.median(raw_rates)
        hub_rate = statistics.median(hub_rates)
        ratio = hub_rate / raw
        last = runs[-1].counters
        print(
            f"\n== {n:,} heartbeats, {m:,} instances, event log {config.event_log}, "
            f"ingest_batch {config.ingest_batch}, median of {args.rounds} round(s) =="
        )
        print(f"raw JetStream pull consumer:         {raw:>9,.0f} msg/s")
        print(
            f"hub end to end (ingress -> Redis):   {hub_rate:>9,.0f} hb/s excluding startup, "
            f"{statistics.median(with_start):,.0f} hb/s with startup "
            f"({statistics.median(r.startup_s for r in runs):.2f} s to rebuild "
            f"{m:,} registrations)"
        )
        print(f"hub end to end (ingress -> Postgres): {statistics.median(pg_rates):>8,.0f} hb/s")
        print(
            f"event log appends (last round): {last.get('events_appended', 0):,} events "
            f"(HeartbeatReceived {last.get('ingress_HeartbeatReceived', 0):,}, timer "
            f"{sum(v for k, v in last.items() if k.startswith('timer_')):,}, projected redis "
            f"{last.get('projected:' + REDIS_VIEW, 0):,} / postgres "
            f"{last.get('projected:' + POSTGRES_VIEW, 0):,})"
        )
        verdict = "met" if ratio >= TARGET else "NOT met"
        print(f"ratio {ratio:.0%} (target >= {TARGET:.0%}: {verdict})")
        if failures:
            print("\nSANITY CHECK FAILED (the figures above are not trustworthy):")
            for f in failures:
                print("  " + f)
            return 2
        print("sanity: every hub phase recorded each heartbeat once and updated every instance")
        return 0
    finally:
        await nc.close()
        await r.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--heartbeats", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2, help="raw/hub rounds (alternating)")
    parser.add_argument(
        "--batch",
        type=int,
        default=HubConfig.ingest_batch,
        help="ingest_batch of the hub, and the raw consumer's fetch size",
    )
    parser.add_argument("--log", choices=("jetstream", "kafka"), default="jetstream")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the last hub phase (the hub process, not its views "
                        "process)")  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.instances, args.heartbeats, args.rounds, args.batch) < 1:
        parser.error("--instances, --heartbeats, --rounds and --batch must be positive")
    if args.instances > 100_000:
        parser.error("--instances: at most 100,000")
    configure("console", logging.WARNING)  # the hub's info logs would bury the figures
    t0 = time.perf_counter()
    servers = "NATS, PostgreSQL, Valkey" + (" and Kafka" if args.log == "kafka" else "")
    print(f"starting {servers} ...", flush=True)
    with (
        scratch_root("hub-bench-ingest-") as root,
        EmbeddedStack(root / "stack", with_kafka=args.log == "kafka") as stack,
    ):
        try:
            code = asyncio.run(bench(args, stack))
        except (RuntimeError, TimeoutError, nats.js.errors.Error) as exc:
            print(f"\nBENCHMARK FAILED: {exc!r}")
            code = 2
    print(f"\n(total wall time {time.perf_counter() - t0:.0f} s; servers stopped)")
    return code


if __name__ == "__main__":
    sys.exit(main())
