"""Abuse benchmark: a query storm and a registration storm against a `hub run` process.

Run from the project root::

    .venv/bin/python -m bench.abuse           # 20,000 instances, 1,000 queries, 100,000 regs
    .venv/bin/python -m bench.abuse --quick   # 5,000 / 300 / 20,000

It starts the embedded stack (NATS+JetStream, PostgreSQL, Valkey) and the hub as a process of
its own (``python -m hub run``, as in production, with its views process and query servers),
so its memory is measured apart from this process's. Two parts:

**Query storm.** ``--instances`` instances in one tenant while heartbeats flow
(``--heartbeat-rate`` per second), then ``--concurrency`` concurrent ``hub.query.services``
(each with a ``--timeout`` s request timeout) at once; then, for ``--sustain`` seconds, as
many askers in a loop, each asking again after 0.1-0.5 s when answered ``BUSY`` (answered/s).
Meanwhile a probe registers an instance every 0.5 s and asks for it with ``min_seq``
(register-to-visible: PubAck to answer, asking again after 20 ms on ``BUSY``). Reported:
how the requests ended (answered, ``BUSY``, ``UNAVAILABLE``, other error codes, no answer
within the timeout), their latency, register-to-visible, and the RSS of the hub process and
of its children (views process, query servers) before, at the peak and after. The raw limit
in the same run: the same number of concurrent requests to a trivial echo responder (a
nats-py process), which every request should reach.

Targets: every request answered or ``BUSY`` within its timeout; register-to-visible under
1 s; hub RSS growth under 200 MB, back within a minute.

**Registration storm.** ``--storm`` registrations in a tenant of their own, published with
2,000 in flight. Reported: when the last one is visible after its PubAck; a page of one
instance (``hub.query.services {"limit": 1}``), median of 20; paging through all of them
with pages of 5,000; hub RSS throughout. The raw limits in the same run: the NATS echo
round trip, and reading every instance hash of the tenant straight from Redis (pipelined
``HGETALL``, 1,000 at a time).

Targets: last visible within 30 s of its PubAck; a page of one in ≤ 50 ms; paging through
100,000 in ≤ 30 s; hub RSS ≤ 500 MB throughout.

Exit code 0 whether targets are met or not (the verdicts are printed); 2 when the benchmark
itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
import nats.errors
from nats.aio.client import Client

from bench._scratch import scratch_root
from events.vocab import Health
from hub.bootstrap import redis_client
from hub.config import HubConfig
from hub.logs import configure
from hub.stack import EmbeddedStack
from projections.keys import instance_keys

WINDOW = 2000
SERVICES = 20
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode

ECHO = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def echo(msg):
        await msg.respond(msg.data)
    await nc.subscribe("bench.echo", cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values`` (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


@dataclass
class Memory:
    """RSS of the hub process and of its children, sampled every 0.25 s."""

    pid: int
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def now(self) -> tuple[float, float]:
        return rss_mb(self.pid), sum(rss_mb(c) for c in children(self.pid))

    async def _run(self) -> None:
        while True:
            hub, kids = self.now()
            self.samples.append((time.monotonic(), hub, kids))
            await asyncio.sleep(0.25)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def peak(self, since: float = 0.0) -> tuple[float, float]:
        window = [s for s in self.samples if s[0] >= since] or [(0.0, 0.0, 0.0)]
        return max(s[1] for s in window), max(s[2] for s in window)


class HubProcess:
    """``python -m hub run`` against the stack, its output in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hub", "run"], env=self.env, stdout=out, stderr=out
            )
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def request(nc: Client, subject: str, body: dict[str, object], timeout: float) -> dict:
    reply = await nc.request(subject, _encode(body), timeout=timeout)
    return _decode(reply.data)  # type: ignore[no-any-return]


async def wait_serving(nc: Client, deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if (await request(nc, "hub.query.infrastructure", {}, 1.0))["success"]:
                return
        await asyncio.sleep(0.2)
    raise RuntimeError("the hub did not answer within 120 s")


async def register(nc: Client, tenant: str, n: int, prefix: str = "inst") -> tuple[int, float]:
    """``n`` registrations (``SERVICES`` services); (last PubAck seq, when it arrived)."""
    js = nc.jetstream()
    subject = "hub.register" if tenant == "default" else f"hub.register.{tenant}"
    last, pending = 0, []
    for i in range(n):
        body = {"service_name": f"svc-{i % SERVICES:02d}", "instance_id": f"{prefix}-{i:06d}",
                "host": "10.1.0.1", "port": 1 + i % 60000, "heartbeat_interval_s": 10,
                "ttl_s": 3600, "expire_after_s": 3600}  # fmt: skip
        pending.append(await js.publish_async(subject, _encode(body)))
        if len(pending) >= WINDOW:
            last = max(last, *(a.seq for a in await asyncio.gather(*pending)))
            pending = []
    if pending:
        last = max(last, *(a.seq for a in await asyncio.gather(*pending)))
    return last, time.monotonic()


async def visible(nc: Client, subject: str, seq: int, deadline_s: float) -> float:
    """When a ``min_seq`` query first answers (polled: the hub waits at most 5 s a time)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
            reply = await request(nc, subject, {"limit": 1, "min_seq": seq}, 10.0)
            if reply["success"]:
                return time.monotonic()
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{subject}: min_seq {seq} not visible within {deadline_s} s")


async def heartbeats(nc: Client, n: int, rate: float, stop: asyncio.Event) -> int:
    """Heartbeats over the default tenant's first ``n`` instances at ``rate`` per second."""
    js = nc.jetstream()
    sent, k = 0, 0
    tick = 0.1
    while not stop.is_set():
        started = time.monotonic()
        futures = []
        for _ in range(max(1, int(rate * tick))):
            i = k % n
            k += 1
            body = {"service_name": f"svc-{i % SERVICES:02d}", "instance_id": f"inst-{i:06d}",
                    "status": Health.HEALTHY, "load": (k % 100) / 100}  # fmt: skip
            futures.append(await js.publish_async("hub.heartbeat", _encode(body)))
        with contextlib.suppress(Exception):
            await asyncio.gather(*futures)
        sent += len(futures)
        await asyncio.sleep(max(0.0, tick - (time.monotonic() - started)))
    return sent


async def probe_visibility(
    nc: Client, stop: asyncio.Event, out: list[float], busy: Counter[str]
) -> None:
    """Every 0.5 s: register a probe instance and time PubAck -> answered with min_seq,
    asking again after 20 ms on BUSY as a client does (counted in ``busy``)."""
    js = nc.jetstream()
    i = 0
    while not stop.is_set():
        body = {"service_name": "probe", "instance_id": f"probe-{i}", "host": "10.9.0.1",
                "port": 9, "heartbeat_interval_s": 10, "ttl_s": 3600}  # fmt: skip
        i += 1
        ack = await js.publish("hub.register", _encode(body))
        acked = time.monotonic()
        try:
            while True:
                reply = await request(
                    nc,
                    "hub.query.service",
                    {"service_name": "probe", "limit": 1, "min_seq": ack.seq},
                    30.0,
                )
                if reply.get("error_code") != "BUSY" or time.monotonic() - acked > 30:
                    break
                busy[f"BUSY: {reply.get('error_message')}"] += 1
                await asyncio.sleep(0.02)
            if reply["success"]:
                out.append(time.monotonic() - acked)
            else:
                busy[str(reply.get("error_code"))] += 1
                out.append(float("inf"))
        except Exception as exc:
            busy[type(exc).__name__] += 1
            out.append(float("inf"))
        await asyncio.sleep(0.5)


async def storm(nc: Client, subject: str, body: dict[str, object], n: int, timeout: float):
    """``n`` concurrent requests; (outcomes, answer latencies)."""

    async def one() -> tuple[str, float]:
        t0 = time.monotonic()
        try:
            reply = await request(nc, subject, body, timeout)
        except nats.errors.TimeoutError:
            return "no answer within the timeout", time.monotonic() - t0
        except nats.errors.NoRespondersError:
            return "no responders", time.monotonic() - t0
        if subject == "bench.echo":
            return "answered", time.monotonic() - t0
        if reply.get("success"):
            return "answered", time.monotonic() - t0
        return str(reply.get("error_code")), time.monotonic() - t0

    results = await asyncio.gather(*(one() for _ in range(n)))
    return Counter(r[0] for r in results), [r[1] for r in results]


async def sustained(
    nc: Client, askers: int, timeout: float, seconds: float
) -> tuple[Counter[str], list[float]]:
    """``askers`` clients asking ``hub.query.services`` in a loop for ``seconds``, each
    asking again after a pause of 0.1-0.5 s when answered BUSY; (outcomes, latencies)."""
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def asker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                reply = await request(nc, "hub.query.services", {}, timeout)
            except nats.errors.TimeoutError:
                outcomes["no answer within the timeout"] += 1
                continue
            except nats.errors.NoRespondersError:
                outcomes["no responders"] += 1
                await asyncio.sleep(0.1)
                continue
            latencies.append(time.monotonic() - t0)
            code = "answered" if reply.get("success") else str(reply.get("error_code"))
            outcomes[code] += 1
            if code != "answered":
                await asyncio.sleep(rng.uniform(0.1, 0.5))

    await asyncio.gather(*(asker(i) for i in range(askers)))
    return outcomes, latencies


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


async def query_storm(args: argparse.Namespace, nc: Client, mem: Memory) -> None:
    print(
        f"\n-- query storm: {args.instances:,} instances, {args.concurrency:,} concurrent "
        f"hub.query.services, heartbeats {args.heartbeat_rate:,.0f}/s --",
        flush=True,
    )
    last, _ = await register(nc, "default", args.instances)
    await visible(nc, "hub.query.services", last, 300)
    stop = asyncio.Event()
    beating = asyncio.create_task(heartbeats(nc, args.instances, args.heartbeat_rate, stop))
    probes: list[float] = []
    probe_replies: Counter[str] = Counter()
    probing = asyncio.create_task(probe_visibility(nc, stop, probes, probe_replies))
    await asyncio.sleep(3)
    before_hub, before_kids = mem.now()
    started = time.monotonic()
    raw_outcomes, raw_lat = await storm(nc, "bench.echo", {"x": 1}, args.concurrency, args.timeout)
    outcomes, lat = await storm(nc, "hub.query.services", {}, args.concurrency, args.timeout)
    kept, kept_lat = await sustained(nc, args.concurrency, args.timeout, args.sustain)
    during = [p for p in probes]
    peak_hub, peak_kids = mem.peak(since=started)
    stop.set()
    sent = await beating
    await probing
    back_after = None
    settle = time.monotonic()
    while time.monotonic() - settle < 60:
        hub, _ = mem.now()
        if hub - before_hub < 50:
            back_after = time.monotonic() - settle
            break
        await asyncio.sleep(1)
    print(f"raw (same run): {args.concurrency:,} concurrent requests to a nats-py echo "
          f"responder: {dict(raw_outcomes)}; latency p50 {pct(raw_lat, 50) * 1000:.0f} ms, "
          f"p99 {pct(raw_lat, 99) * 1000:.0f} ms")  # fmt: skip
    print(
        f"hub: {dict(outcomes)}; latency p50 {pct(lat, 50) * 1000:.0f} ms, "
        f"p99 {pct(lat, 99) * 1000:.0f} ms, worst {max(lat) * 1000:.0f} ms"
    )
    answered = kept["answered"]
    print(
        f"hub, {args.concurrency:,} askers for {args.sustain:g} s, each asking again after "
        f"0.1-0.5 s when BUSY: {dict(kept)}; {answered / args.sustain:,.0f} answered/s; "
        f"latency p50 {pct(kept_lat, 50) * 1000:.0f} ms, p99 {pct(kept_lat, 99) * 1000:.0f} ms"
    )
    finite = [p for p in during if p != float("inf")]
    print(
        f"register-to-visible during the storm ({len(during)} probes, {sent:,} heartbeats): "
        f"median {statistics.median(finite) * 1000 if finite else 0:.0f} ms, worst "
        f"{max(during) * 1000 if during else 0:.0f} ms"
        + ("" if len(finite) == len(during) else f", {len(during) - len(finite)} not visible")
        + (
            f" (probe replies asked again or failed: {dict(probe_replies)})"
            if probe_replies
            else ""
        )
    )
    print(
        f"RSS: hub {before_hub:.0f} MB before, peak {peak_hub:.0f} MB "
        f"(+{peak_hub - before_hub:.0f}), "
        + (
            f"back within 50 MB after {back_after:.0f} s"
            if back_after is not None
            else "not back within 60 s"
        )
        + f"; children (views, query servers) {before_kids:.0f} -> peak {peak_kids:.0f} MB"
    )
    answered_or_busy = all(k in ("answered", "BUSY") for k in (*outcomes, *kept))
    print(
        f"targets: every request answered or BUSY: {verdict(answered_or_busy)}; "
        f"register-to-visible < 1 s: {verdict(bool(during) and max(during) < 1.0)}; "
        f"RSS growth < 200 MB and back within a minute: "
        f"{verdict(peak_hub - before_hub < 200 and back_after is not None)}"
    )


async def registration_storm(
    args: argparse.Namespace, nc: Client, mem: Memory, config: HubConfig
) -> None:
    n = args.storm
    print(f"\n-- registration storm: {n:,} registrations in tenant 'storm' --", flush=True)
    started = time.monotonic()
    last, acked = await register(nc, "storm", n, prefix="s")
    print(f"acknowledged {n:,} in {acked - started:.1f} s", flush=True)
    seen = await visible(nc, "hub.query.services.storm", last, 600)
    peak_hub, peak_kids = mem.peak(since=started)
    # Page of one.
    one: list[float] = []
    for _ in range(20):
        t0 = time.monotonic()
        reply = await request(nc, "hub.query.services.storm", {"limit": 1}, 10)
        one.append(time.monotonic() - t0)
        assert reply["success"], reply
    echo: list[float] = []
    for _ in range(20):
        t0 = time.monotonic()
        await request(nc, "bench.echo", {"limit": 1}, 10)
        echo.append(time.monotonic() - t0)
    # Paging through all.
    t0 = time.monotonic()
    cursor, walked, pages = None, 0, 0
    while True:
        reply = await request(nc, "hub.query.services.storm",
                              {"limit": 5000, "cursor": cursor}, 30)  # fmt: skip
        assert reply["success"], reply
        walked += sum(len(s["instances"]) for s in reply["data"])
        pages += 1
        cursor = reply["metadata"].get("next_cursor")
        if cursor is None:
            break
    paging = time.monotonic() - t0
    # Raw: every instance hash of the tenant from Redis.
    r = redis_client(config)  # the hub's view store, as the hub's processes reach it
    t0 = time.monotonic()
    keys = [k async for k in r.scan_iter(match=instance_keys("storm"), count=5000)]
    for i in range(0, len(keys), 1000):
        async with r.pipeline(transaction=False) as pipe:
            for k in keys[i : i + 1000]:
                pipe.hgetall(k)
            await pipe.execute()
    raw_read = time.monotonic() - t0
    await r.aclose()
    total_peak_hub, _ = mem.peak(since=started)
    print(f"last registration visible {seen - acked:.1f} s after its PubAck")
    print(
        f"page of one: median {statistics.median(one) * 1000:.1f} ms, worst "
        f"{max(one) * 1000:.1f} ms (raw NATS echo round trip: median "
        f"{statistics.median(echo) * 1000:.1f} ms)"
    )
    print(
        f"paging through all: {walked:,} instances in {pages} pages, {paging:.1f} s (raw: every "
        f"instance hash read from Redis, {len(keys):,} keys, {raw_read:.1f} s)"
    )
    print(
        f"RSS: hub peak {total_peak_hub:.0f} MB (until visible {peak_hub:.0f} MB), children peak "
        f"{peak_kids:.0f} MB"
    )
    print(
        f"targets: visible within 30 s: {verdict(seen - acked <= 30)}; page of one <= 50 ms: "
        f"{verdict(statistics.median(one) <= 0.05)}; paging <= 30 s: "
        f"{verdict(paging <= 30 and walked == n)}; hub RSS <= 500 MB: "
        f"{verdict(total_peak_hub <= 500)}"
    )


async def bench(args: argparse.Namespace, stack: EmbeddedStack, root: Path) -> int:
    env = {**os.environ, **stack.env(), "HUB_LOG_FORMAT": "json"}
    env.update(dict(kv.split("=", 1) for kv in args.env))
    hub = HubProcess(env, root / "hub.log")
    echo = subprocess.Popen([sys.executable, "-c", ECHO, stack.nats.url],  # noqa: ASYNC220
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        pid = hub.start()
        nc = await nats.connect(stack.nats.url, name="bench-abuse", pending_size=256 * 1024**2)
        try:
            await wait_serving(nc)
            mem = Memory(pid)
            mem.start()
            print(f"hub running (pid {pid}), RSS {mem.now()[0]:.0f} MB, children "
                  f"{mem.now()[1]:.0f} MB", flush=True)  # fmt: skip
            if not args.skip_queries:
                await query_storm(args, nc, mem)
            if args.storm:
                await registration_storm(args, nc, mem, HubConfig.from_env(env))
            await mem.stop()
        finally:
            await nc.close()
    finally:
        hub.stop()
        echo.kill()
        echo.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=1_000)
    parser.add_argument("--heartbeat-rate", type=float, default=1_000.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="each query's timeout (s)")
    parser.add_argument("--sustain", type=float, default=15.0, help="seconds of askers that "
                        "ask again after BUSY, after the burst")  # fmt: skip
    parser.add_argument("--storm", type=int, default=100_000, help="registrations (0: none)")
    parser.add_argument("--skip-queries", action="store_true")
    parser.add_argument("--quick", action="store_true", help="5,000 / 300 / 20,000")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the hub")
    args = parser.parse_args(argv)
    if args.quick:
        args.instances, args.concurrency, args.storm = 5_000, 300, 20_000
    configure("console")
    started = time.monotonic()
    with scratch_root("hub-bench-abuse-") as root:
        stack = EmbeddedStack(root)
        print("starting NATS, PostgreSQL, Valkey ...", flush=True)
        with stack:
            try:
                code = asyncio.run(bench(args, stack, root))
            except Exception as exc:  # the benchmark could not measure
                print(f"bench.abuse failed: {exc!r}", file=sys.stderr)
                tail = (root / "hub.log").read_text(errors="replace")[-3000:]
                print(tail, file=sys.stderr)
                return 2
    print(f"\n(total wall time {time.monotonic() - started:.0f} s; servers stopped)")
    return code


if __name__ == "__main__":
    sys.exit(main())
