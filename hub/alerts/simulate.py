"""``hub alerts simulate``: the recorded history decided again with other rules, printed.

Reads the event log (read-only: nothing is written anywhere), runs the what-if fold
(``handlers.whatif``) with the rules file given, and prints what would have fired and
been notified, next to what was recorded: the extra alerts, the ones that would not
have fired, and the notifications on each side.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, TextIO

from events.model import Event
from handlers.alert_rules import AlertingConfig
from handlers.whatif import Episode, Simulation
from hub import bootstrap
from hub.alerts.rules import ALERTS_FILE_ENV, load_alerting
from hub.config import HubConfig


async def recorded_events(config: HubConfig) -> list[Event]:
    """Every event of the configured log, in log order (read-only)."""
    nc = await bootstrap.log_nats(config, "central-hub-simulate")
    log = bootstrap.make_event_log(config, nc, read_only=True)
    await log.start()
    try:
        return [r.event async for records in log.read(None, follow=False) for r in records]
    finally:
        await log.close()
        if nc is not None:
            await nc.close()


def load_rules(path: str) -> AlertingConfig:
    """The rules file as the hub reads it (every mistake an ``AlertConfigError``)."""
    return load_alerting({ALERTS_FILE_ENV: path}, None)[0]


def when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _labels(e: Episode) -> str:
    shown = {k: v for k, v in sorted(e.labels.items()) if k not in ("alertname", "severity")}
    return ",".join(f"{k}={v}" for k, v in shown.items())


def report(result: Simulation, out: TextIO, *, as_json: bool = False) -> None:
    """Print the comparison (or JSON with the same content)."""
    extra, missing = result.extra(), result.missing()
    if as_json:

        def ep(e: Episode) -> dict[str, Any]:
            return {"rule": e.rule, "severity": e.severity, "labels": e.labels,
                    "active_since": e.active_since, "fired_at": e.fired_at,
                    "resolved_at": e.resolved_at}  # fmt: skip

        json.dump({"events": result.events, "would_fire": [ep(e) for e in result.fired],
                   "fired": [ep(e) for e in result.recorded_fired],
                   "extra": [ep(e) for e in extra], "not_firing": [ep(e) for e in missing],
                   "would_notify": len(result.notified),
                   "notified": len(result.recorded_notified)}, out, indent=2)  # fmt: skip
        out.write("\n")
        return
    out.write(f"{result.events} events read; with these rules {len(result.fired)} alert(s) "
              f"would have fired ({len(result.recorded_fired)} did) and "
              f"{len(result.notified)} notification(s) would have been due "
              f"({len(result.recorded_notified)} were)\n")  # fmt: skip
    for title, episodes in (("extra: would have fired, did not", extra),
                            ("would not have fired, did", missing)):  # fmt: skip
        out.write(f"\n{title} ({len(episodes)}):\n")
        for e in episodes:
            out.write(f"  {e.rule:<24} {e.severity:<8} fired {when(e.fired_at)}  "
                      f"resolved {when(e.resolved_at)}  {_labels(e)}\n")  # fmt: skip
    out.write(f"\nwould notify ({len(result.notified)}):\n")
    for n in result.notified:
        out.write(f"  {when(n.ts)}  {n.receiver:<24} firing {len(n.firing)} "
                  f"resolved {len(n.resolved)}  {n.group_key}\n")  # fmt: skip
