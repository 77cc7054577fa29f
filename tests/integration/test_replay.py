"""Replay rebuilds every view from the log, identical to what live traffic built."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from hub.replay import Connections
from projections.postgres import WRITTEN_TABLES
from tests.integration.conftest import ROOT, eventually, query

# A lease no test outlasts (the default TTL is 3 x 10 s heartbeats).
LONG_TTL_S = 3600.0


def hub_cli(config, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **config.to_env()}
    return subprocess.run(
        [sys.executable, "-m", "hub", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


async def hub_cli_async(config, *args: str) -> tuple[int, str]:
    """``hub_cli`` without blocking the event loop (for a hub running in this process)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hub", *args, cwd=ROOT, env={**os.environ, **config.to_env()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode or 0, out.decode()


async def eventually_equal(
    read: Callable[[], Awaitable[Any]], expected: Any, *, timeout: float = 30.0
) -> Any:
    """Read a view until it shows ``expected``, then return it; after ``timeout`` (a hang
    guard, not a speed target) fail with the last value read, compared to ``expected``.

    For a view read after a push or a CLI step: the views follow the log in processes
    of their own, so they may lag what was pushed; a wrong view never converges.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = await read()
        if got == expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert got == expected
    return got


def checksums(out: str) -> dict[str, str]:
    return dict(re.findall(r"^(postgres|redis)\s+OK\s+view (\w+)", out, re.M))


async def wipe_views(pg, rds) -> None:
    """Throw both views away: every table the PostgreSQL projection writes, all keys."""
    await pg.execute(f"TRUNCATE {', '.join(WRITTEN_TABLES)}")
    await pg.execute("DELETE FROM projection_checkpoints")
    await rds.flushdb()


async def replay_reproduces_the_views(hub, config, pg, rds) -> dict[str, str]:
    """Stop the hub once its views have caught up with its log (no more timer
    decisions), then: `hub verify` passes; both views wiped; `hub replay`; `hub verify`
    passes with the same checksums. Returns them."""

    await eventually(
        lambda: all(hub.progress.up_to_date(p.name) for p in hub.projections), timeout=30
    )
    await hub.stop()
    first = hub_cli(config, "verify")
    assert first.returncode == 0, first.stdout + first.stderr
    sums = checksums(first.stdout)
    assert set(sums) == {"postgres", "redis"}, first.stdout
    await wipe_views(pg, rds)
    replayed = hub_cli(config, "replay")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    again = hub_cli(config, "verify")
    assert again.returncode == 0, again.stdout + again.stderr
    assert checksums(again.stdout) == sums
    return sums


async def live_traffic(nc) -> int:
    """Registrations, heartbeats, deregistrations, a re-registration and bad input.

    With a TTL no test outlasts: the lease timer must not change the views while a test
    compares them (the default, 30 s, is within reach of a slow run of `hub` commands)."""
    js = nc.jetstream()
    futures = []
    for i in range(30):
        reg = {"service_name": f"svc-{i % 3}", "instance_id": f"i-{i}", "host": "10.0.0.1",
               "port": 2000 + i, "version": f"1.{i % 2}", "metadata": {"n": i},
               "ttl_s": LONG_TTL_S}  # fmt: skip
        futures.append(await js.publish_async("hub.register", msgspec.json.encode(reg)))
    for round_ in range(3):
        for i in range(30):
            hb = {"service_name": f"svc-{i % 3}", "instance_id": f"i-{i}",
                  "status": ["healthy", "degraded", "unhealthy"][(i + round_) % 3],
                  "load": (i * 7 % 10) / 10}  # fmt: skip
            futures.append(await js.publish_async("hub.heartbeat", msgspec.json.encode(hb)))
    for i in range(0, 30, 6):
        d = {"service_name": f"svc-{i % 3}", "instance_id": f"i-{i}"}
        futures.append(await js.publish_async("hub.deregister", msgspec.json.encode(d)))
    again = {"service_name": "svc-0", "instance_id": "i-0", "host": "10.0.0.2", "port": 1,
             "ttl_s": LONG_TTL_S}  # fmt: skip
    futures.append(await js.publish_async("hub.register", msgspec.json.encode(again)))
    futures.append(await js.publish_async("hub.register.acme", b"{broken"))
    futures.append(
        await js.publish_async("hub.heartbeat", b'{"service_name":"x","instance_id":"y"}')
    )
    acks = await asyncio.gather(*futures)
    return max(a.seq for a in acks)  # fmt: skip


async def test_verify_replay_verify_gives_the_same_checksums(
    start_hub, event_log_kind, hub_config, nc, pg, rds
):
    """Live traffic -> `hub verify` passes; a corrupted row and key are reported; both views
    wiped (queries: UNAVAILABLE, not empty) -> `hub replay` -> `hub verify` passes with the
    checksums from before the wipe, and queries answer as before. (Self-monitoring off:
    its check results would change the views between the two verifies, as they should.)"""
    hub = await start_hub(infra_self=False)
    last = await live_traffic(nc)
    before = await query(nc, "hub.query.services", {"min_seq": last})
    assert before["success"] and len(before["data"]) == 3
    await eventually(
        lambda: all(hub.progress.reflects(p.name, last) for p in hub.projections), timeout=30
    )

    ok = hub_cli(hub_config, "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    sums = checksums(ok.stdout)
    assert set(sums) == {"postgres", "redis"}, ok.stdout

    # Verify can fail: it names the row and the key that differ from the log.
    await pg.execute("UPDATE service_registry SET version = 'tampered' WHERE instance_id = 'i-1'")
    await rds.hset("hub:default:inst:svc-1:i-1", "host", "6.6.6.6")
    bad = hub_cli(hub_config, "verify")
    assert bad.returncode == 1
    assert "MISMATCH" in bad.stdout
    assert "service_registry/default/svc-1/i-1" in bad.stdout
    assert "hub:default:inst:svc-1:i-1" in bad.stdout

    # Wipe both views (the running hub notices and rebuilds them itself: meanwhile a
    # query is told the view is unavailable, never answered with an empty registry),
    # then rebuild them from the log (one rebuild at a time).
    await wipe_views(pg, rds)
    reply = await query(nc, "hub.query.services", {})
    assert reply["error_code"] == "UNAVAILABLE" or reply["data"] == before["data"], reply

    replayed = hub_cli(hub_config, "replay")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "events" in replayed.stderr  # progress was shown
    again = hub_cli(hub_config, "verify")
    assert again.returncode == 0, again.stdout + again.stderr
    assert checksums(again.stdout) == sums

    async def listed() -> object:
        return (await query(nc, "hub.query.services", {}))["data"]

    await eventually_equal(listed, before["data"])

    # The live hub keeps projecting on top of the rebuilt views.
    ack = await nc.jetstream().publish(
        "hub.register", b'{"service_name":"late","host":"10.9.9.9","port":9}'
    )
    late = await query(nc, "hub.query.services", {"name": "late", "min_seq": ack.seq})
    assert [s["service_name"] for s in late["data"]] == ["late"]


def view_settings(view: Any) -> dict[str, Any]:
    """A view's settings from the configuration. (The projections keep them private:
    read here rather than widened into their API for one test.)"""
    return {"cache": view._cache.limit, "journal_days": getattr(view, "_journal_days", None)}


async def test_replay_and_verify_get_the_views_built_as_the_hub_builds_them(start_hub):
    """`hub replay` / `hub verify` (``Connections.open``) build the views with the running
    hub's settings, view cache and check-journal retention, not the projections'
    defaults (they once did: the PostgreSQL view without either)."""
    hub = await start_hub(view_cache=123, infra_history_days=2.5)
    conn = await Connections.open(hub.config)
    try:
        hubs = {p.name: view_settings(p) for p in hub.projections}
        replays = {v.name: view_settings(v) for v in conn.views.values()}
    finally:
        await conn.close()
    assert replays == hubs
    assert hubs == {
        "postgres-registry": {"cache": 123, "journal_days": 2.5},
        "redis-registry": {"cache": 123, "journal_days": None},
    }
