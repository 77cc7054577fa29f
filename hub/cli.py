"""The ``hub`` command line.

* ``hub run``  — the hub, configured from the environment (twelve-factor).
* ``hub dev``  — the embedded stack (NATS+JetStream, PostgreSQL, a Redis-protocol
  server; Kafka with ``--kafka``) on loopback, plus the hub; Ctrl-C stops all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from hub.config import ConfigError, HubConfig
from hub.logs import configure


async def _serve(config: HubConfig, started_message: str | None = None) -> None:
    from hub.app import Hub

    hub = Hub(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, hub._stop.set)
    await hub.start()
    if started_message:
        print(started_message, flush=True)
    try:
        await hub.wait()
    finally:
        await hub.stop()


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = HubConfig.from_env()
    except ConfigError as exc:
        print(f"hub: configuration error: {exc}", file=sys.stderr)
        return 2
    configure(config.log_format)
    asyncio.run(_serve(config))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from hub.stack import EmbeddedStack

    configure("console")
    data = Path(args.data).resolve()
    data.mkdir(parents=True, exist_ok=True)
    stack = EmbeddedStack(data, with_kafka=args.kafka)
    print(f"hub dev: starting the embedded stack in {data} ...", flush=True)
    with stack:
        for name, where in stack.describe():
            print(f"  {name:<24} {where}", flush=True)
        config = HubConfig.from_env(stack.env())
        print(f"  {'event log':<24} {config.event_log}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(config, "hub dev: hub running; Ctrl-C stops everything"))
    print("hub dev: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hub", description="Central Hub coordinator")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the hub against the servers named in the environment")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("dev", help="run the embedded stack and the hub on loopback")
    p.add_argument("--data", default=".data/dev", help="data folder (default: .data/dev)")
    p.add_argument("--kafka", action="store_true", help="also start Kafka and use it as the log")
    p.set_defaults(func=cmd_dev)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
