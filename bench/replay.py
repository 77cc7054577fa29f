"""Replay benchmark: the hub's ``replay`` of a Kafka log against a plain aiokafka read.

Run from the project root::

    .venv/bin/python -m bench.replay                      # 1,000,000 events, 10,000 instances
    .venv/bin/python -m bench.replay --events 100000      # quick run
    .venv/bin/python -m bench.replay --profile            # plus where replay time goes

It starts its own Kafka, PostgreSQL and Valkey (``hub.stack``) in a temporary directory,
writes a synthetic but realistic event log into a fresh topic, then alternates

* ``raw``: plain ``AIOKafkaConsumer`` (read_committed) reading every partition to its end
  offset and doing nothing with the messages: the ceiling for any Python reader;
* ``replay``: ``hub.replay.replay(conn)`` rebuilding both views (PostgreSQL and Redis),
  split into the fold (fetch + decode + fold, ``fold_log``) and the view writes (rebuild);

and prints the medians and the ratio replay/raw against the target (>= 50 % of raw).
After each replay the views are checked against what the generator expects, so an empty
or partial replay cannot pass for a fast one. Everything is stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import pstats
import random
import re
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from bench._scratch import scratch_root
from events.codec import decode_event
from events.log import LogRecord, Positions, advance
from events.model import (
    Event,
    HeartbeatReceived,
    InputRejected,
    ServiceDeregistered,
    ServiceRegistered,
)
from events.vocab import Health
from hub.bootstrap import connect_postgres, make_event_log, redis_client
from hub.config import HubConfig
from hub.eventlog.kafka import log_reader
from hub.replay import Connections, fold_log, replay
from hub.stack import KafkaServer, PostgresServer, RedisServer
from projections import keys
from projections.fold import ViewState

TARGET = 0.50  # replay must reach this fraction of the raw aiokafka read rate
PARTITIONS = 6
T0_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds

SERVICES = (
    "api-gateway", "auth", "billing", "catalog", "checkout", "search", "inventory",
    "notifications", "orders", "payments", "pricing", "profile", "recommendations",
    "reviews", "shipping", "tax", "users", "warehouse", "ledger", "fraud-check",
    "media", "geo", "sessions", "audit", "reports", "data-bridge.v2", "scheduler",
    "mailer", "webhooks", "feature-flags",
)  # fmt: skip
TENANTS = ("default", "default", "default", "acme", "acme", "globex")  # weighted
REJECTS = (
    ("hub.register", "INVALID_JSON", "payload is not valid JSON", "{broken"),
    ("hub.heartbeat", "SCHEMA", "field 'instance_id': expected str", '{"instance_id": 7}'),
    ("hub.heartbeat", "UNKNOWN_INSTANCE", "heartbeat for an instance that is not registered", ""),
    ("hub.register", "TOO_LARGE", "message exceeds 65536 bytes", ""),
)


# --- the event log -------------------------------------------------------------------------


@dataclass
class Expected:
    """What the views must hold after replaying the generated log."""

    events: int = 0
    instances: int = 0  # rows of service_registry (deregistered ones included)
    live: int = 0  # instances in the Redis view
    rejections: int = 0  # rows of input_rejections
    kinds: Counter[str] = field(default_factory=Counter)


@dataclass
class _Inst:
    tenant: str
    service: str
    instance_id: str
    host: str
    port: int
    version: str
    depends_on: list[str]
    live: bool = False


def generate(
    n_events: int, n_instances: int, expected: Expected, *, chunk: int, seed: int = 7
) -> Iterator[list[Event]]:
    """Chunks of events: one registration per instance, then mostly heartbeats, some
    deregistrations, re-registrations, re-announcements and rejected input."""
    rng = random.Random(seed)
    seq = 0
    t_us = T0_US
    n_instances = min(n_instances, n_events)
    insts = []
    for i in range(n_instances):
        service = SERVICES[i % len(SERVICES)]
        insts.append(
            _Inst(
                tenant=rng.choice(TENANTS),
                service=service,
                instance_id=f"{service}-{i:05d}",
                host=f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
                port=8000 + i % 1000,
                version=f"1.{rng.randrange(20)}.{rng.randrange(10)}",
                depends_on=sorted(rng.sample(SERVICES, rng.randrange(4))),
            )
        )
    dead: list[int] = []
    batch: list[Event] = []

    def envelope(tenant: str) -> dict[str, Any]:
        nonlocal seq, t_us
        seq += 1
        t_us += rng.randrange(1, 2000)
        return {
            "event_id": f"ingress-{seq}",
            "tenant": tenant,
            "ts": t_us / 1e6,
            "ingress_seq": seq,
        }

    def register(inst: _Inst) -> ServiceRegistered:
        if not inst.live:
            expected.live += 1
        inst.live = True
        return ServiceRegistered(
            **envelope(inst.tenant),
            service_name=inst.service,
            instance_id=inst.instance_id,
            host=inst.host,
            port=inst.port,
            protocol=rng.choice(("http", "http", "grpc")),
            version=inst.version,
            metadata={"zone": f"eu-{rng.randrange(3)}", "team": inst.service},
            transport_preferences=["nats", "http"],
            heartbeat_interval_s=10.0,
            depends_on=inst.depends_on,
        )

    def random_live() -> _Inst:
        while True:
            inst = insts[rng.randrange(n_instances)]
            if inst.live:
                return inst

    for i in range(n_events):
        r = rng.random()
        if i < n_instances:
            e: Event = register(insts[i])
        elif r < 0.010:
            subject, code, reason, excerpt = rng.choice(REJECTS)
            tenant = "_invalid" if code == "INVALID_JSON" else rng.choice(TENANTS)
            e = InputRejected(
                **envelope(tenant),
                subject=subject,
                reason_code=code,
                reason=reason,
                excerpt=excerpt,
            )
            expected.rejections += 1
        elif r < 0.013 and len(dead) < n_instances // 2:
            inst = random_live()
            inst.live = False
            expected.live -= 1
            dead.append(_index(inst))
            e = ServiceDeregistered(
                **envelope(inst.tenant),
                service_name=inst.service,
                instance_id=inst.instance_id,
                reason=rng.choice(("requested", "shutdown")),
            )
        elif r < 0.0155 and dead:
            j = rng.randrange(len(dead))
            dead[j], dead[-1] = dead[-1], dead[j]
            e = register(insts[dead.pop()])  # a restarted instance comes back
        elif r < 0.0175:
            inst = random_live()  # re-announcement, e.g. after a deploy
            inst.version = f"1.{rng.randrange(20)}.{rng.randrange(10)}"
            e = register(inst)
        else:
            inst = random_live()
            x = rng.random()
            status = (Health.HEALTHY if x < 0.9 else Health.DEGRADED if x < 0.97
                      else Health.UNHEALTHY)  # fmt: skip
            checks = {"db": "ok", "queue_depth": rng.randrange(100)} if x < 0.3 else {}
            e = HeartbeatReceived(
                **envelope(inst.tenant),
                service_name=inst.service,
                instance_id=inst.instance_id,
                status=status,
                load=round(rng.random(), 3),
                checks=checks,
            )
        expected.kinds[type(e).__name__] += 1
        batch.append(e)
        if len(batch) >= chunk:
            yield batch
            batch = []
    if batch:
        yield batch
    expected.events = n_events
    expected.instances = n_instances


def _index(inst: _Inst) -> int:
    # Instance ids end with their index: ``<service>-<i:05d>``.
    return int(inst.instance_id.rsplit("-", 1)[1])


async def produce(
    config: HubConfig, n_events: int, n_instances: int, chunk: int
) -> tuple[Expected, float]:
    """Append the generated log (one transaction per chunk) to the configured topic, as
    the hub would; returns it and the seconds."""
    expected = Expected()
    log = make_event_log(config, None)
    await log.start()
    t0 = time.perf_counter()
    try:
        for events in generate(n_events, n_instances, expected, chunk=chunk):
            await log.append(events)
    finally:
        await log.close()
    return expected, time.perf_counter() - t0


# --- the two measurements ------------------------------------------------------------------


async def raw_read(
    bootstrap: str, topic: str, *, keep: list[Any] | None = None
) -> tuple[int, float]:
    """Read the whole topic with plain aiokafka; returns (messages, seconds, start to stop).

    With ``keep`` the messages are appended to it (only for ``--profile``; not timed then).
    """
    t0 = time.perf_counter()
    consumer = log_reader(bootstrap)
    await consumer.start()
    try:
        # The benchmark created the topic with PARTITIONS partitions (checked below).
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        if consumer.partitions_for_topic(topic) != set(range(PARTITIONS)):
            raise RuntimeError(
                f"topic {topic!r}: partitions {consumer.partitions_for_topic(topic)}"
            )
        count = 0
        while True:
            fetched = await consumer.getmany(*tps, timeout_ms=200)
            for msgs in fetched.values():
                count += len(msgs)
                if keep is not None:
                    keep.extend(msgs)
            if all([await consumer.position(tp) >= end[tp] for tp in tps]):
                break
    finally:
        await consumer.stop()
    return count, time.perf_counter() - t0


@dataclass
class ReplayRun:
    events: int
    total_s: float
    rebuild_s: dict[str, float]
    positions: Positions

    @property
    def write_s(self) -> float:
        return sum(self.rebuild_s.values())

    @property
    def fold_s(self) -> float:
        return self.total_s - self.write_s


async def replay_run(config: HubConfig) -> ReplayRun:
    """``hub.replay.replay`` into both views, timed; the views' rebuilds timed separately."""
    conn = await Connections.open(config)  # pool, schema, topic check: set-up, not timed
    try:
        rebuild_s: dict[str, float] = {}
        for name, view in conn.views.items():
            original = view.rebuild

            async def timed(
                v: ViewState, p: Positions, _orig: Any = original, _name: str = name
            ) -> None:
                t = time.perf_counter()
                await _orig(v, p)
                rebuild_s[_name] = time.perf_counter() - t

            view.rebuild = timed  # type: ignore[method-assign]
        out = io.StringIO()
        t0 = time.perf_counter()
        positions = await replay(conn, out=out)
        total = time.perf_counter() - t0
    finally:
        await conn.close()
    done = re.findall(r"replay: (\d+)/\d+ events", out.getvalue())
    return ReplayRun(int(done[-1]) if done else -1, total, rebuild_s, positions)


# --- sanity --------------------------------------------------------------------------------


async def view_counts(config: HubConfig) -> dict[str, int]:
    """What the views hold: Redis instance keys and svc-set members, PostgreSQL rows."""
    r = redis_client(config)
    try:
        inst_keys = 0
        svc_keys = []
        async for key in r.scan_iter(match=keys.every_key(), count=10_000):
            kind = keys.kind_of(key)
            if kind == keys.INSTANCE:
                inst_keys += 1
            elif kind == keys.SERVICE:
                svc_keys.append(key)
        async with r.pipeline(transaction=False) as pipe:
            for key in svc_keys:
                pipe.scard(key)
            members = sum(await pipe.execute())
    finally:
        await r.aclose()
    pg = await connect_postgres(config)
    try:
        rows = await pg.fetchval("SELECT count(*) FROM service_registry")
        live_rows = await pg.fetchval(
            "SELECT count(*) FROM service_registry WHERE status <> $1", Health.DEREGISTERED
        )
        rejections = await pg.fetchval("SELECT count(*) FROM input_rejections")
    finally:
        await pg.close()
    return {
        "redis_inst_keys": inst_keys,
        "redis_svc_members": members,
        "pg_rows": rows,
        "pg_live_rows": live_rows,
        "pg_rejections": rejections,
    }


def check(run: ReplayRun, counts: dict[str, int], expected: Expected) -> list[str]:
    want = {
        "events folded": (run.events, expected.events),
        "redis_inst_keys": (counts["redis_inst_keys"], expected.live),
        "redis_svc_members": (counts["redis_svc_members"], expected.live),
        "pg_rows": (counts["pg_rows"], expected.instances),
        "pg_live_rows": (counts["pg_live_rows"], expected.live),
        "pg_rejections": (counts["pg_rejections"], expected.rejections),
    }
    return [f"{k}: got {got:,}, expected {exp:,}" for k, (got, exp) in want.items() if got != exp]


# --- where the time goes (--profile) ------------------------------------------------------------


def _top(profile: cProfile.Profile, n: int = 18) -> str:
    buf = io.StringIO()
    pstats.Stats(profile, stream=buf).sort_stats("tottime").print_stats(n)
    lines = buf.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(lines[start : start + n + 1])


async def profile(config: HubConfig, bootstrap: str, topic: str) -> None:
    print("\n== where replay time goes (--profile) ==")
    msgs: list[Any] = []
    count, fetch_s = await raw_read(bootstrap, topic, keep=msgs)
    values = [m.value for m in msgs]
    t = time.perf_counter()
    events = [decode_event(v) for v in values]
    decode_s = time.perf_counter() - t
    t = time.perf_counter()
    records = [LogRecord(m.partition, m.offset, e) for m, e in zip(msgs, events, strict=True)]
    record_s = time.perf_counter() - t
    del msgs, values
    t = time.perf_counter()
    view = ViewState()
    for e in events:
        view.apply(e)
    evolve_s = time.perf_counter() - t
    t = time.perf_counter()
    positions: Positions = {}
    for i in range(0, len(records), 5000):
        positions = advance(positions, records[i : i + 5000])
    advance_s = time.perf_counter() - t
    del records, events
    gc.collect()
    parts = [
        ("kafka fetch (plain aiokafka, keeping the messages)", fetch_s),
        ("decode_event (msgspec JSON -> Event)", decode_s),
        ("LogRecord(...) per message", record_s),
        ("ViewState.apply (evolve) per event", evolve_s),
        ("advance(positions, batch) per 5000", advance_s),
    ]
    print(f"in isolation, {count:,} events (all kept in memory, so the GC inflates these):")
    total = sum(s for _, s in parts)
    for label, s in [*parts, ("sum", total)]:
        us = s / count * 1e6
        print(f"  {label:<52} {s:7.2f} s  {us:6.2f} us/ev  {count / s:>11,.0f} ev/s")

    log = make_event_log(config, None, read_only=True)
    await log.start()
    # The cyclic GC's share: every record and event is a GC-tracked object, and batches
    # of them live long enough to be promoted and traversed again by older generations.
    print("\nthe cyclic garbage collector's share (GC off is an experiment, not how replay runs):")
    for what in ("raw aiokafka read", "fold_log"):
        for label, gc_off in (("GC on", False), ("GC off", True)):
            gc.collect()
            if gc_off:
                gc.disable()
            t = time.perf_counter()
            try:
                if what == "fold_log":
                    await fold_log(log)
                else:
                    await raw_read(bootstrap, topic)
            finally:
                gc.enable()
            s = time.perf_counter() - t
            us = s / count * 1e6
            name = f"{what}, {label}"
            print(f"  {name:<52} {s:7.2f} s  {us:6.2f} us/ev  {count / s:>11,.0f} ev/s")
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    view, positions = await fold_log(log)
    prof.disable()
    print(
        f"\nfold_log under cProfile: {time.perf_counter() - t:.2f} s (profiler overhead "
        "included); top functions by own time:"
    )
    print(_top(prof))
    await log.close()

    conn = await Connections.open(config)
    try:
        for name, v in conn.views.items():
            prof = cProfile.Profile()
            t = time.perf_counter()
            prof.enable()
            await v.rebuild(view, positions)
            prof.disable()
            print(
                f"\n{name} rebuild under cProfile: {time.perf_counter() - t:.2f} s; "
                "top functions by own time:"
            )
            print(_top(prof, 12))
    finally:
        await conn.close()


# --- main ----------------------------------------------------------------------------------


async def bench(
    args: argparse.Namespace, kafka: KafkaServer, pg: PostgresServer, valkey: RedisServer, db: str
) -> int:
    topic = f"bench-replay-{uuid.uuid4().hex[:8]}"
    config = HubConfig(
        event_log="kafka",
        kafka_brokers=(kafka.bootstrap,),
        kafka_topic=topic,
        kafka_partitions=PARTITIONS,
        postgres_host=pg.host,
        postgres_port=pg.port,
        postgres_db=db,
        postgres_user=pg.user,
        postgres_password=pg.password,
        redis_host=valkey.host,
        redis_port=valkey.port,
    )
    n = args.events
    print(
        f"producing {n:,} events over {min(args.instances, n):,} instances into {topic} "
        f"({PARTITIONS} partitions, {args.chunk:,} events per transaction) ...",
        flush=True,
    )
    expected, produce_s = await produce(config, n, args.instances, args.chunk)
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(expected.kinds.items()))
    print(
        f"produced in {produce_s:.1f} s ({n / produce_s:,.0f} ev/s; not the figure that "
        f"matters): {kinds}"
    )
    print(
        f"expected views: {expected.instances:,} instances ({expected.live:,} live), "
        f"{expected.rejections:,} rejections\n",
        flush=True,
    )

    raw_rates: list[float] = []
    replay_rates: list[float] = []
    runs: list[ReplayRun] = []
    failures: list[str] = []
    for round_ in range(1, args.rounds + 1):
        count, s = await raw_read(kafka.bootstrap, topic)
        if count != n:
            failures.append(f"round {round_} raw read: {count:,} messages, expected {n:,}")
        raw_rates.append(count / s)
        print(
            f"round {round_}  raw aiokafka read: {count:,} msgs in {s:6.2f} s = "
            f"{count / s:>9,.0f} ev/s",
            flush=True,
        )
        gc.collect()
        run = await replay_run(config)
        runs.append(run)
        replay_rates.append(n / run.total_s)
        split = ", ".join(f"{k} {v:.2f} s" for k, v in run.rebuild_s.items())
        print(
            f"round {round_}  hub replay:        {run.events:,} events in {run.total_s:6.2f} s = "
            f"{n / run.total_s:>9,.0f} ev/s  (fold {run.fold_s:.2f} s = "
            f"{n / run.fold_s:,.0f} ev/s; write {run.write_s:.2f} s: {split})",
            flush=True,
        )
        counts = await view_counts(config)
        problems = check(run, counts, expected)
        failures += [f"round {round_} views: {p}" for p in problems]
        print(
            f"          views: redis {counts['redis_inst_keys']:,} live instances "
            f"({counts['redis_svc_members']:,} svc-set members), postgres "
            f"{counts['pg_rows']:,} service_registry rows ({counts['pg_live_rows']:,} live), "
            f"{counts['pg_rejections']:,} input_rejections -> "
            f"{'OK' if not problems else 'WRONG'}",
            flush=True,
        )
        gc.collect()

    raw = statistics.median(raw_rates)
    rep = statistics.median(replay_rates)
    fold = statistics.median(n / r.fold_s for r in runs)
    write = statistics.median(r.write_s for r in runs)
    ratio = rep / raw
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(f"\n== {n:,} events, {expected.instances:,} instances, median of {args.rounds} rounds ==")
    print(
        f"raw aiokafka read: {raw:,.0f} ev/s | hub replay: {rep:,.0f} ev/s "
        f"(fold {fold:,.0f} ev/s, write {write:.1f} s) | ratio {ratio:.0%} "
        f"(target >= {TARGET:.0%}: {verdict})"
    )
    fold_ratio = fold / raw
    print(f"fold alone (read + decode + fold, no view writes): {fold_ratio:.0%} of raw")
    if failures:
        print("\nSANITY CHECK FAILED (the figures above are not trustworthy):")
        for f in failures:
            print("  " + f)
        return 2
    print("sanity: every replay rebuilt the expected views")
    if args.profile:
        await profile(config, kafka.bootstrap, topic)
    return 0 if ratio >= TARGET else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=10_000, help="events per transaction")
    parser.add_argument("--rounds", type=int, default=2, help="raw/replay rounds (alternating)")
    parser.add_argument("--profile", action="store_true", help="then show where replay time goes")
    args = parser.parse_args(argv)
    if args.events < 1 or args.instances < 1 or args.rounds < 1 or args.chunk < 1:
        parser.error("--events, --instances, --rounds and --chunk must be positive")

    t0 = time.perf_counter()
    with scratch_root("hub-bench-replay-") as root, contextlib.ExitStack() as stack:
        print(f"starting Kafka, PostgreSQL and Valkey in {root} ...", flush=True)
        kafka = stack.enter_context(KafkaServer(root / "kafka"))
        pg = stack.enter_context(PostgresServer(root / "postgres"))
        valkey = stack.enter_context(RedisServer(root / "valkey"))
        db = "bench_replay"
        pg.create_database(db)
        code = asyncio.run(bench(args, kafka, pg, valkey, db))
    print(f"\n(total wall time {time.perf_counter() - t0:.0f} s; servers stopped)")
    return code


if __name__ == "__main__":
    sys.exit(main())
