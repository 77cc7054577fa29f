"""Query latency while ingest is saturated, against the raw NATS request/reply in the same run.

Run from the project root::

    .venv/bin/python -m bench.query                  # 10,000 instances, 300 requests of each kind
    .venv/bin/python -m bench.query --requests 100   # quick run

It starts the embedded stack and the hub as a process of its own (``python -m hub run``:
its views process and query servers as in production), registers ``--instances``
instances (20 services), then starts a publisher process that sends heartbeats over them
as fast as it can (as ``bench.ingest`` does: more than the hub absorbs, so its ingest runs
flat out the whole time). Meanwhile, one request at a time, round robin:

* **raw**: a request to a trivial nats-py echo responder (a process of its own): the
  round trip of the layer beneath, under the same load;
* ``hub.query.instances`` for one service (``--instances`` / 20 instances, the whole
  service in one page), and with ``pick: "round_robin"`` (one instance);
* ``hub.query.services`` with ``limit`` ``--page`` (a page of the tenant).

Printed: p50 and p99 of each, and each p99 against the raw p99. **Target: p99 <= 2 x raw.**
Exit code 0 whether the target is met or not; 2 when the benchmark failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time

import msgspec
import nats
from nats.aio.client import Client

from bench._scratch import scratch_root
from bench.abuse import ECHO, HubProcess, pct, register, visible, wait_serving
from hub.logs import configure
from hub.stack import EmbeddedStack

_encode = msgspec.json.Encoder().encode

PUBLISHER = """
import asyncio, sys, msgspec, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    n = int(sys.argv[2])
    bodies = [msgspec.json.encode({"service_name": f"svc-{i % 20:02d}",
              "instance_id": f"inst-{i:06d}", "status": "healthy", "load": 0.5})
              for i in range(n)]
    print("ready", flush=True)
    k = 0
    while True:
        futures = []
        for _ in range(2000):
            futures.append(await js.publish_async("hub.heartbeat", bodies[k % n]))
            k += 1
        await asyncio.gather(*futures, return_exceptions=True)
asyncio.run(main())
"""


async def timed(nc: Client, subject: str, body: dict[str, object]) -> float:
    t0 = time.perf_counter()
    reply = await nc.request(subject, _encode(body), timeout=30)
    elapsed = time.perf_counter() - t0
    if subject != "bench.echo":
        decoded = msgspec.json.decode(reply.data)
        if not decoded["success"]:
            raise RuntimeError(f"{subject}: {decoded}")
    return elapsed


async def ingress_pending(nc: Client) -> int:
    info = await nc.jetstream().consumer_info("HUB_INGRESS", "hub-ingest")
    return int(info.num_pending or 0)


async def bench(args: argparse.Namespace, stack: EmbeddedStack, root) -> int:  # type: ignore[no-untyped-def]
    env = {**os.environ, **stack.env(), "HUB_LOG_FORMAT": "json"}
    env.update(dict(kv.split("=", 1) for kv in args.env))
    hub = HubProcess(env, root / "hub.log")
    helpers = [
        subprocess.Popen([sys.executable, "-c", ECHO, stack.nats.url],  # noqa: ASYNC220
                         stdout=subprocess.PIPE, text=True),
    ]  # fmt: skip
    try:
        assert helpers[0].stdout is not None and helpers[0].stdout.readline().strip() == "ready"
        hub.start()
        nc = await nats.connect(stack.nats.url, name="bench-query")
        try:
            await wait_serving(nc)
            last, _ = await register(nc, "default", args.instances)
            await visible(nc, "hub.query.services", last, 300)
            publisher = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-c", PUBLISHER, stack.nats.url, str(args.instances)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            helpers.append(publisher)
            assert publisher.stdout is not None and publisher.stdout.readline().strip() == "ready"
            await asyncio.sleep(3)  # let the backlog build: ingest runs flat out from here
            backlog_before = await ingress_pending(nc)
            service = "svc-00"
            kinds: dict[str, tuple[str, dict[str, object]]] = {
                "raw NATS echo": ("bench.echo", {"service_name": service}),
                f"instances ({args.instances // 20} of one service)": (
                    "hub.query.instances", {"service_name": service}),
                "instances, pick round_robin": (
                    "hub.query.instances", {"service_name": service, "pick": "round_robin"}),
                f"services (page of {args.page})": ("hub.query.services", {"limit": args.page}),
            }  # fmt: skip
            samples: dict[str, list[float]] = {k: [] for k in kinds}
            for _ in range(args.requests):
                for name, (subject, body) in kinds.items():
                    samples[name].append(await timed(nc, subject, body))
            backlog_after = await ingress_pending(nc)
        finally:
            await nc.close()
    finally:
        hub.stop()
        for p in helpers:
            p.kill()
            p.wait()
    raw99 = pct(samples["raw NATS echo"], 99)
    print(f"\n== {args.instances:,} instances, {args.requests} requests of each kind, one at a "
          f"time, while ingest is saturated (ingress backlog {backlog_before:,} -> "
          f"{backlog_after:,}) ==")  # fmt: skip
    ok = True
    for name, values in samples.items():
        p50, p99 = pct(values, 50) * 1000, pct(values, 99) * 1000
        line = f"{name:<36} p50 {p50:7.1f} ms   p99 {p99:7.1f} ms"
        if name != "raw NATS echo":
            ratio = pct(values, 99) / raw99 if raw99 else float("inf")
            ok = ok and ratio <= 2.0
            line += f"   p99 = {ratio:.1f} x raw"
        print(line)
    print(f"target p99 <= 2 x raw p99: {'met' if ok else 'NOT met'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--page", type=int, default=100, help="limit of hub.query.services")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the hub")
    args = parser.parse_args(argv)
    configure("console")
    started = time.monotonic()
    with scratch_root("hub-bench-query-") as root:
        stack = EmbeddedStack(root)
        print("starting NATS, PostgreSQL, Valkey ...", flush=True)
        with stack:
            try:
                code = asyncio.run(bench(args, stack, root))
            except Exception as exc:
                print(f"bench.query failed: {exc!r}", file=sys.stderr)
                with contextlib.suppress(OSError):
                    print((root / "hub.log").read_text(errors="replace")[-3000:], file=sys.stderr)
                return 2
    print(f"\n(total wall time {time.monotonic() - started:.0f} s; servers stopped)")
    return code


if __name__ == "__main__":
    sys.exit(main())
