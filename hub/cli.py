"""The ``hub`` command line.

* ``hub run``  — the hub, configured from the environment (twelve-factor).
* ``hub query-server`` — one process answering ``hub.query.*`` (``hub run`` starts
  ``HUB_QUERY_SERVERS`` itself; this runs more, or runs them elsewhere), configured
  from the environment like ``hub run``.
* ``hub replay`` / ``hub verify`` — rebuild the views from the log / check them.
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

from hub.alerts.rules import AlertConfigError
from hub.config import ConfigError, HubConfig
from hub.infra.config import InfraConfigError
from hub.logs import configure


async def _serve(config: HubConfig, started_message: str | None = None) -> int:
    """Run the hub until a signal stops it (0) or it stops by itself: its exit code, with
    one line on stderr saying why (1: an internal task kept failing; 3: fenced, another
    hub is the writer now)."""
    from hub.app import Hub

    def say(line: str) -> None:
        print(f"hub: {line}", file=sys.stderr, flush=True)

    hub = Hub(config, on_standby=say)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, hub._stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = asyncio.ensure_future(hub.reload_infra())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        await hub.start()
    except InfraConfigError as exc:
        what = (
            "alert rules" if isinstance(exc, AlertConfigError) else "infrastructure configuration"
        )
        print(f"hub: {what} error: {exc}", file=sys.stderr)
        await hub.stop()
        raise SystemExit(2) from None
    if started_message:
        print(started_message, flush=True)
    try:
        await hub.wait()
    finally:
        await hub.stop()
    if hub.exit_code:
        say(f"{hub.exit_reason}; stopping (exit {hub.exit_code})")
    return hub.exit_code


def cmd_run(args: argparse.Namespace) -> int:
    config = _configured()
    if config is None:
        return 2
    return asyncio.run(_serve(config))


def cmd_query_server(args: argparse.Namespace) -> int:
    from hub.query_server import serve

    config = _configured()
    if config is None:
        return 2
    return asyncio.run(serve(config))


def cmd_dev(args: argparse.Namespace) -> int:
    from hub.stack.dev import run_dev

    configure("console")
    with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C before dev's own handlers
        return run_dev(Path(args.data), with_kafka=args.kafka)
    return 0


def _configured() -> HubConfig | None:
    """The configuration from the environment, logging set up; None (and said why) if bad."""
    try:
        config = HubConfig.from_env()
    except ConfigError as exc:
        print(f"hub: configuration error: {exc}", file=sys.stderr)
        return None
    configure(config.log_format)
    return config


def _views(args: argparse.Namespace) -> tuple[str, ...]:
    from hub.replay import VIEWS

    return VIEWS if args.view == "all" else (args.view,)


def cmd_replay(args: argparse.Namespace) -> int:
    from hub.eventlog.port import EventLogNotFound
    from hub.replay import Connections, replay

    config = _configured()
    if config is None:
        return 2
    views = _views(args)

    async def run() -> None:
        conn = await Connections.open(config)
        try:
            positions = await replay(conn, views)
        finally:
            await conn.close()
        print(f"hub replay: rebuilt {', '.join(views)} from the {config.event_log} log "
              f"up to {positions}")  # fmt: skip

    try:
        asyncio.run(run())
    except EventLogNotFound as exc:
        print(f"hub replay: {exc} (check the configured event log)", file=sys.stderr)
        return 2
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from hub.eventlog.port import EventLogNotFound
    from hub.replay import Connections, verify

    config = _configured()
    if config is None:
        return 2
    views = _views(args)

    async def run() -> bool:
        conn = await Connections.open(config)
        try:
            reports = await verify(conn, views)
        finally:
            await conn.close()
        for r in reports:
            verdict = "OK" if r.ok else "MISMATCH"
            print(f"{r.name:<9} {verdict:<8} view {r.view_checksum}  log {r.log_checksum}  "
                  f"checkpoint {r.checkpoint}")  # fmt: skip
            if r.moving:
                print(f"  {len(r.moving)} instance(s) heartbeated past the checkpoint while "
                      "verifying: compared without their heartbeat fields")  # fmt: skip
            for line in r.problems[: args.max_problems]:
                print("  " + line)
            if len(r.problems) > args.max_problems:
                print(f"  ... and {len(r.problems) - args.max_problems} more")
        return all(r.ok for r in reports)

    try:
        ok = asyncio.run(run())
    except EventLogNotFound as exc:
        print(f"hub verify: {exc} (check the configured event log)", file=sys.stderr)
        return 2
    return 0 if ok else 1


def cmd_alerts_simulate(args: argparse.Namespace) -> int:
    from handlers.whatif import simulate
    from hub.alerts.simulate import load_rules, recorded_events, report
    from hub.eventlog.port import EventLogNotFound

    config = _configured()
    if config is None:
        return 2
    try:
        rules = load_rules(args.rules)
    except (InfraConfigError, OSError) as exc:
        print(f"hub alerts simulate: {exc}", file=sys.stderr)
        return 2
    try:
        events = asyncio.run(recorded_events(config))
    except EventLogNotFound as exc:
        print(f"hub alerts simulate: {exc} (check the configured event log)", file=sys.stderr)
        return 2
    report(simulate(events, rules, since=args.since), sys.stdout, as_json=args.json)
    return 0


def _since(text: str) -> float:
    """--since: epoch seconds or an ISO 8601 time (UTC unless it says otherwise)."""
    from datetime import UTC, datetime

    try:
        return float(text)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected epoch seconds or an ISO time such as 2026-12-01T10:00:00Z, got {text!r}"
        ) from None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hub", description="Central Hub coordinator")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the hub against the servers named in the environment")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("query-server", help="answer hub.query.* from the views (configured "
                       "from the environment like 'hub run')")  # fmt: skip
    p.set_defaults(func=cmd_query_server)
    p = sub.add_parser("dev", help="run the embedded stack and the hub on loopback")
    p.add_argument("--data", default=".data/dev", help="data folder (default: .data/dev)")
    p.add_argument("--kafka", action="store_true", help="also start Kafka and use it as the log")
    p.set_defaults(func=cmd_dev)
    for name, func, text in (
        ("replay", cmd_replay, "rebuild views from the start of the event log (shadow + swap)"),
        ("verify", cmd_verify, "check views against the fold of the event log (exit 0/1)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--view", choices=["all", "postgres", "redis"], default="all")
        p.set_defaults(func=func)
        if name == "verify":
            p.add_argument("--max-problems", type=int, default=20)
    p = sub.add_parser("alerts", help="alerting tools")
    alerts = p.add_subparsers(dest="alerts_command", required=True)
    p = alerts.add_parser("simulate", help="decide the recorded history again with other "
                          "rules and print what would have fired and been notified (writes "
                          "nothing)")  # fmt: skip
    p.add_argument("--rules", required=True, help="the rules file to try (alerts file format)")
    p.add_argument("--since", type=_since, default=None,
                   help="decide from this time on (epoch seconds or ISO time)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_alerts_simulate)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
