"""Monitor benchmark: 500 components checked every second, inside a running hub.

Run from the project root::

    .venv/bin/python -m bench.monitor                     # 500 components, 1 s, 20 s window
    .venv/bin/python -m bench.monitor --components 1000 --seconds 30

It starts the embedded stack (NATS+JetStream, PostgreSQL, Valkey) and a hub in this
process whose infrastructure file lists ``--components`` TCP checks at ``--interval``
against the stack's own listening servers (real connects, real closes). After a warm-up
it measures, over the window:

* achieved checks/s (results recorded as ``InfraChecked`` events, read back from the
  PostgreSQL ``infra_checks`` journal) against the configured rate (components/interval);
* drift: per component, the gaps between successive checks (should all be ~interval) and
  how far its last check is from where a drift-free schedule puts it;
* the hub process's CPU share (process CPU time / wall time; 100 % = one core);
* and, as the raw limit of the layer beneath, the rate at which this machine completes
  bare asyncio TCP connect+close against the same servers, measured in the same run.

Target: achieved >= 99 % of the configured rate, no cumulative drift (the last check of
every component within one interval of its schedule).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import sys
import time
from pathlib import Path

import yaml

from bench._scratch import scratch_root
from events.vocab import InfraStatus
from hub.app import Hub
from hub.bootstrap import connect_postgres
from hub.config import HubConfig
from hub.stack import EmbeddedStack


def infrastructure(targets: list[int], n: int, interval: float) -> dict:
    return {
        "databases": [
            {
                "name": f"c{i:04d}",
                "host": "127.0.0.1",
                "port": targets[i % len(targets)],
                "type": "tcp",
                "health_check": {
                    "method": "tcp",
                    "interval": interval,
                    "timeout": min(1.0, interval),
                },
            }
            for i in range(n)
        ],
        "messaging": [],
        "search": [],
    }


async def raw_connect_rate(ports: list[int], seconds: float, concurrency: int = 50) -> float:
    """Bare asyncio connect+close per second against ``ports`` (``concurrency`` at once)."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker(k: int) -> None:
        nonlocal done
        while time.monotonic() < stop:
            _, writer = await asyncio.open_connection("127.0.0.1", ports[(done + k) % len(ports)])
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            done += 1

    start = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / (time.monotonic() - start)


async def bench(args: argparse.Namespace, stack: EmbeddedStack, infra_path: Path) -> int:
    config = HubConfig.from_env({**stack.env(), "HUB_INFRA_CONFIG": str(infra_path),
                                 "HUB_INFRA_SELF": "0", "HUB_LOG_FORMAT": "json"})  # fmt: skip
    ports = [stack.nats.port, stack.redis.port]
    raw = await raw_connect_rate(ports, 3.0)
    hub = Hub(config)
    await hub.start()
    pg = await connect_postgres(config)
    try:
        await asyncio.sleep(args.warmup)
        t0, c0 = time.time(), time.process_time()
        await asyncio.sleep(args.seconds)
        t1, c1 = time.time(), time.process_time()
        await asyncio.sleep(1.5)  # let the last results reach the journal
        rows = await pg.fetch(
            "SELECT component, extract(epoch FROM ts) AS t, status FROM infra_checks"
            " WHERE ts >= to_timestamp($1) AND ts < to_timestamp($2) ORDER BY component, ts",
            t0,
            t1,
        )
        scheduler = hub.monitor.scheduler if hub.monitor else None
        skipped = scheduler.skipped if scheduler else -1
    finally:
        await pg.close()
        await hub.stop()
    window = t1 - t0
    configured = args.components / args.interval
    achieved = len(rows) / window
    unhealthy = sum(1 for r in rows if r["status"] != InfraStatus.HEALTHY)
    per: dict[str, list[float]] = {}
    for r in rows:
        per.setdefault(r["component"], []).append(float(r["t"]))
    gaps = [b - a for ts in per.values() for a, b in itertools.pairwise(ts)]
    # Drift-free: check k of a component is at first + k * interval.
    lag = [ts[-1] - (ts[0] + round((ts[-1] - ts[0]) / args.interval) * args.interval)
           for ts in per.values() if len(ts) > 1]  # fmt: skip
    cpu = (c1 - c0) / window
    print(f"\ncomponents {args.components}, interval {args.interval:g} s, window {window:.1f} s")
    print(f"  configured rate            {configured:10,.1f} checks/s")
    print(f"  achieved (recorded events) {achieved:10,.1f} checks/s  "
          f"({100 * achieved / configured:.1f} % of configured)")  # fmt: skip
    print(f"  raw TCP connect+close      {raw:10,.1f} /s  (this machine, same run; the "
          f"monitor uses {100 * achieved / raw:.1f} % of it)")  # fmt: skip
    print(f"  components seen            {len(per):10d}   unhealthy results {unhealthy}")
    if gaps:
        print(f"  gap between checks         median {statistics.median(gaps):.3f} s, "
              f"min {min(gaps):.3f} s, max {max(gaps):.3f} s")  # fmt: skip
        print(f"  schedule offset of last    median {statistics.median(lag) * 1000:+.1f} ms, "
              f"worst {max(abs(x) for x in lag) * 1000:.1f} ms")  # fmt: skip
    print(f"  skipped slots (check still running at its next slot): {skipped}")
    print(f"  hub process CPU            {100 * cpu:10.1f} % of one core")
    ok = achieved >= 0.99 * configured and (not lag or max(abs(x) for x in lag) < args.interval)
    ok = ok and len(per) == args.components and unhealthy == 0
    print(f"  target (>= 99 % of configured, no drift): {'met' if ok else 'NOT met'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.monitor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--components", type=int, default=500)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.components < 1 or args.interval <= 0 or args.seconds <= 0:
        parser.error("--components, --interval and --seconds must be positive")
    with scratch_root("hub-bench-monitor-") as root, EmbeddedStack(root / "stack") as stack:
        path = root / "infrastructure.yaml"
        ports = [stack.nats.port, stack.redis.port]
        path.write_text(yaml.safe_dump(infrastructure(ports, args.components, args.interval)))
        return asyncio.run(bench(args, stack, path))


if __name__ == "__main__":
    sys.exit(main())
