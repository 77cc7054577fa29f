"""Alerts benchmark: 1,000 of 10,000 instances go critical at once; how soon is everyone told?

Run from the project root::

    .venv/bin/python -m bench.alerts                        # 10,000 instances, 1,000 critical
    .venv/bin/python -m bench.alerts --instances 2000 --critical 200

It starts the embedded stack (NATS+JetStream, PostgreSQL, Valkey; JetStream event log) and a
hub in this process, with one alert rule (``instance_critical``, ``for: 0s``) routed to a
receiver with a webhook and a NATS integration, grouped by ``alertname`` and ``service``
(``--services`` groups), ``group_wait`` ``--group-wait``.

A publisher process registers ``--instances`` instances: ``--critical`` of them heartbeat
every second (lease 3 s), in phase, ``--beats`` times and then stop together; the others
have a lease far beyond the run. A sink process is the webhook receiver (a real HTTP server)
and records when each notification arrived. Measured, from the hub's own record of the first
``critical`` decision (event time, wall clock, same machine):

    every alert firing   last AlertFiring.ts                     - first critical
    every webhook taken  last notification received by the sink  - first critical
    every send recorded  last NotificationSent.ts                - first critical

and how many of the critical instances the webhook's notifications list (all of them, once).
``group_wait`` is a configured wait inside that time, so the hub's own share (the time less
``group_wait``) is printed too. The raw floor beside it is the webhook receiver's own round
trip: a POST of a body as large as one notification, from this process to the sink, measured
in the same run (the dispatcher posts one group after another, so the floor of the whole is
the number of groups times one round trip).

Exit code 0 whether or not any figure pleases; non-zero only when the benchmark fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import yaml

from bench._scratch import scratch_root
from bench.detection import nearest_rank
from events.model import AlertFiring, InstanceHealthChanged, NotificationDue, NotificationSent
from events.vocab import Health
from hub.app import Hub
from hub.config import HubConfig
from hub.logs import configure
from hub.stack import EmbeddedStack

_encode = msgspec.json.Encoder().encode
SERVICE = "svc-{:02d}"


def instance(i: int, args: argparse.Namespace) -> tuple[str, str, bool]:
    """(service, instance id, goes critical) of instance ``i``."""
    return SERVICE.format(i % args.services), f"inst-{i:05d}", i < args.critical


async def publisher(args: argparse.Namespace) -> None:
    """``--role publisher``: register everyone, beat the critical ones in phase, stop them
    together; print the wall time of the last acknowledged heartbeat."""
    nc = await nats.connect(args.nats, name="bench-instances")
    js = nc.jetstream()
    futures = []
    for i in range(args.instances):
        service, iid, critical = instance(i, args)
        futures.append(await js.publish_async("hub.register", _encode({
            "service_name": service, "instance_id": iid, "host": "10.0.0.1", "port": 8000 + i,
            "heartbeat_interval_s": 1.0 if critical else 600.0,
            "ttl_s": 3.0 if critical else 3600.0, "expire_after_s": 24 * 3600.0,
        })))  # fmt: skip
    await asyncio.gather(*futures)
    beats = [_encode({"service_name": s, "instance_id": iid, "status": Health.HEALTHY})
             for s, iid, c in (instance(i, args) for i in range(args.critical))]  # fmt: skip
    last_ack = 0.0
    for _ in range(args.beats):
        began = time.time()
        acks = [await js.publish_async("hub.heartbeat", b) for b in beats]
        await asyncio.gather(*acks)
        last_ack = time.time()
        await asyncio.sleep(max(0.0, 1.0 - (last_ack - began)))
    await nc.close()
    print(json.dumps({"last_ack": last_ack}), flush=True)


async def sink(args: argparse.Namespace) -> None:
    """``--role sink``: the webhook receiver; on a line on stdin, print what it received
    (wall-clock receipt time, path, status, alerts listed, notification id)."""
    from tests.integration.webhook_sink import serve_webhook

    offset = time.time() - time.monotonic()
    async with serve_webhook() as hook:
        print(f"ready {hook.port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        print(json.dumps([
            {"at": r.at + offset, "path": r.path, "status": r.body.get("status"),
             "alerts": [a["labels"].get("instance") for a in r.body.get("alerts", [])],
             "id": r.body.get("notificationId")}
            for r in hook.requests
        ]), flush=True)  # fmt: skip


async def child(role: str, args: argparse.Namespace) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.alerts", "--role", role, "--nats", args.nats or "-",
        "--instances", str(args.instances), "--critical", str(args.critical),
        "--services", str(args.services), "--beats", str(args.beats),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def webhook_floor(url: str, alerts: int, posts: int) -> list[float]:
    """Round trips of a POST as large as one notification of ``alerts`` alerts."""
    body = _encode(
        {
            "alerts": [
                {
                    "labels": {
                        "alertname": "InstanceCritical",
                        "instance": f"i{i}",
                        "service": "svc",
                        "tenant": "default",
                    },
                    "annotations": {},
                    "status": "firing",
                }
                for i in range(alerts)
            ]
        }
    )
    samples = []
    async with httpx.AsyncClient(trust_env=False) as client:
        for i in range(posts + 5):  # the first 5 warm up
            t = time.perf_counter()
            (await client.post(url, content=body)).raise_for_status()
            if i >= 5:
                samples.append(time.perf_counter() - t)
    return samples


def rules_file(path: Path, url: str, args: argparse.Namespace) -> Path:
    path.write_text(yaml.safe_dump({
        "rules": [{"alert": "InstanceCritical", "source": "instance_critical", "for": "0s",
                   "severity": "critical",
                   "annotations": {"summary": "{instance} missed its lease"}}],
        "route": {"receiver": "ops", "group_by": ["alertname", "service"],
                  "group_wait": args.group_wait, "group_interval": "5m",
                  "repeat_interval": "4h"},
        "receivers": [{"name": "ops", "webhook_configs": [{"url": url, "max_attempts": 3}],
                       "nats_configs": [{}]}],
    }))  # fmt: skip
    return path


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


async def bench(args: argparse.Namespace, stack: EmbeddedStack, root: Path) -> int:
    args.nats = stack.nats.url
    receiver = await child("sink", args)
    assert receiver.stdin is not None and receiver.stdout is not None
    port = int((await receiver.stdout.readline()).split()[1])
    hook = f"http://127.0.0.1:{port}/hook"
    # The hub reads its rules file from the environment (HUB_ALERTS_FILE).
    os.environ["HUB_ALERTS_FILE"] = str(rules_file(root / "alerts.yaml", hook, args))
    hub = Hub(dataclasses.replace(HubConfig.from_env(stack.env()), infra_self=False))
    await hub.start()
    try:
        per_group = math.ceil(args.critical / args.services)
        floor = await webhook_floor(f"http://127.0.0.1:{port}/floor", per_group, args.posts)
        print(f"registering {args.instances} instances; {args.critical} beat {args.beats} "
              "times and stop together ...", flush=True)  # fmt: skip
        publisher_proc = await child("publisher", args)
        out, _ = await publisher_proc.communicate()
        last_ack = json.loads(out)["last_ack"]

        deadline = time.monotonic() + 3.0 + args.group_wait + args.patience
        while time.monotonic() < deadline:
            state = hub.ingest.state.alerts if hub.ingest else None
            if state and len(state.alerts) >= args.critical and not state.outbox and all(
                    g.notified for g in state.groups.values()):  # fmt: skip
                break
            await asyncio.sleep(0.05)
        assert receiver.stdin is not None
        receiver.stdin.write(b"done\n")
        await receiver.stdin.drain()
        got = json.loads((await receiver.stdout.readline()) or b"[]")
        await receiver.wait()
        events = [r.event async for rs in hub.event_log.read(None, follow=False) for r in rs]
    finally:
        await hub.stop()
    return report(args, events, [g for g in got if g["path"] == "/hook"], floor, last_ack)


def report(args: argparse.Namespace, events: list[Any], got: list[dict[str, Any]],
           floor: list[float], last_ack: float) -> int:  # fmt: skip
    criticals = [e for e in events if isinstance(e, InstanceHealthChanged)
                 and e.status == Health.CRITICAL]  # fmt: skip
    firing = [e for e in events if isinstance(e, AlertFiring)]
    sent = [e for e in events if isinstance(e, NotificationSent)]
    due = [e.ts for e in events if isinstance(e, NotificationDue)]
    if not criticals or not got:
        print(f"FAILED: {len(criticals)} criticals, {len(got)} webhook notifications")
        return 1
    t0 = min(e.ts for e in criticals)
    listed = [a for g in got if g["status"] == "firing" for a in g["alerts"]]
    webhook_last = max(g["at"] for g in got)
    p50 = statistics.median(floor)
    groups = len({g["id"] for g in got})
    print(
        f"\n{len(criticals)} instances went critical, all decided within "
        f"{ms(max(e.ts for e in criticals) - t0).strip()} of the first (the first "
        f"{1000 * (t0 - last_ack - 3.0):+.1f} ms from the lease end by the publisher's clock)"
    )
    print(f"  every alert firing    {ms(max(e.ts for e in firing) - t0)}   ({len(firing)} alerts)")
    print(f"  notifications due     {ms(min(due) - t0)} .. {ms(max(due) - t0).strip()}   "
          f"({len(due)}: each group's wait runs from its own first alert)")  # fmt: skip
    print(
        f"  every webhook taken   {ms(webhook_last - t0)}   (the first at "
        f"{ms(min(g['at'] for g in got) - t0).strip()}; {groups} notifications listing "
        f"{len(listed)} alerts, {len(set(listed))} distinct of {args.critical})"
    )
    print(
        f"  every send recorded   {ms(max(e.ts for e in sent) - t0)}   ({len(sent)} sends: "
        "webhook and NATS)"
    )
    print(f"  of which group_wait   {ms(args.group_wait)}   (configured)")
    print(
        f"  hub's own share       {ms(webhook_last - t0 - args.group_wait)}   "
        "(webhook taken less group_wait)"
    )
    print(
        f"\nraw floor: webhook round trip of one {math.ceil(args.critical / args.services)}"
        f"-alert POST p50 {ms(p50)}, p99 {ms(nearest_rank(floor, 0.99))} "
        f"({len(floor)} posts); {groups} in sequence: {ms(groups * p50)}"
    )
    ok = len(set(listed)) == args.critical == len(listed)
    print(
        f"\nevery critical instance notified exactly once to the webhook: {'yes' if ok else 'NO'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.alerts", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--critical", type=int, default=1_000)
    parser.add_argument("--services", type=int, default=10, help="services (alert groups)")
    parser.add_argument("--beats", type=int, default=3)
    parser.add_argument("--group-wait", type=float, default=1.0, help="seconds")
    parser.add_argument("--posts", type=int, default=50, help="round trips for the floor")
    parser.add_argument("--patience", type=float, default=120.0, help="seconds to wait at most")
    parser.add_argument("--role", choices=("main", "publisher", "sink"), default="main",
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--nats", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role != "main":
        asyncio.run(publisher(args) if args.role == "publisher" else sink(args))
        return 0
    if not 0 < args.critical <= args.instances or args.services < 1:
        parser.error("need 0 < --critical <= --instances and --services >= 1")
    configure("console", logging.ERROR)  # the notifications' log lines would bury the figures
    t0 = time.perf_counter()
    print("starting NATS, PostgreSQL and Valkey ...", flush=True)
    with scratch_root("hub-bench-alerts-") as root, EmbeddedStack(root / "stack") as stack:
        code = asyncio.run(bench(args, stack, root))
    print(f"\n(total wall time {time.perf_counter() - t0:.0f} s; servers stopped)")
    return code


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
