"""The views' projectors run in a child process: killed, it is replaced; behind, it is sent
back to the log; orphaned, it ends. The views equal the fold of the log throughout."""

from __future__ import annotations

import asyncio
import os
import signal

import msgspec

from tests.integration.conftest import (
    HubProcess,
    alive,
    child_running,
    eventually,
    query,
    query_all,
)
from tests.integration.test_replay import hub_cli, live_traffic


async def heartbeats(nc, n: int, *, status: str = "healthy") -> int:
    """``n`` heartbeats round robin over live_traffic's instances; the last ingress seq."""
    js = nc.jetstream()
    futures = []
    for k in range(n):
        i = k % 30
        hb = {"service_name": f"svc-{i % 3}", "instance_id": f"i-{i}", "status": status,
              "load": (k % 100) / 100, "checks": {"disk": f"ok {k}"}}  # fmt: skip
        futures.append(await js.publish_async("hub.heartbeat", msgspec.json.encode(hb)))
    return max(a.seq for a in await asyncio.gather(*futures))


async def views_reflect(hub, seq: int) -> None:
    await eventually(
        lambda: all(hub.progress.reflects(p.name, seq) for p in hub.projections), timeout=60
    )


async def verified(hub, config) -> None:
    """Stop the hub with its views caught up; `hub verify`: each view equals the fold."""
    await eventually(
        lambda: all(hub.progress.up_to_date(p.name) for p in hub.projections), timeout=30
    )
    await hub.stop()
    out = await asyncio.to_thread(hub_cli, config, "verify")
    assert out.returncode == 0, out.stdout + out.stderr


async def test_a_killed_views_process_is_replaced_and_misses_nothing(start_hub, hub_config, nc):
    """The projectors run in a process other than the hub's. SIGKILLed while traffic
    goes on, it is replaced; the new one reads what it missed from the log, and both views
    equal the fold."""
    hub = await start_hub(infra_self=False)
    first = hub.views.pid
    assert first is not None and first != os.getpid() and alive(first)
    last = await live_traffic(nc)
    await views_reflect(hub, last)

    os.kill(first, signal.SIGKILL)
    last = await heartbeats(nc, 600, status="degraded")
    reg = {"service_name": "svc-new", "instance_id": "late", "host": "10.0.0.9", "port": 9}
    ack = await nc.jetstream().publish("hub.register", msgspec.json.encode(reg))
    await eventually(
        lambda: hub.views.restarts == 1 and hub.views.pid not in (None, first), timeout=60
    )
    assert not alive(first)
    assert hub.metrics.get("views_process_restarts") == 1
    await views_reflect(hub, max(last, ack.seq))

    listed = await query_all(nc, "hub.query.services", {})
    assert {(i["service_name"], i["instance_id"]) for i in listed} >= {("svc-new", "late")}
    svc1 = await query(nc, "hub.query.instances", {"service_name": "svc-1"})
    assert svc1["success"] and svc1["data"], svc1
    assert {i["reported_status"] for i in svc1["data"]} == {"degraded"}, svc1
    await verified(hub, hub_config)


async def test_a_views_process_that_falls_behind_reads_the_log(start_hub, hub_config, nc):
    """The child stopped (SIGSTOP) while the hub appends: the pipe fills, the hub skips the
    appends it cannot send and later says so (a gap); the child's projectors leave the tail,
    read the log, and both views equal the fold."""
    hub = await start_hub(infra_self=False)
    hub.views.max_buffer = 1  # skip whatever the pipe does not take at once
    last = await live_traffic(nc)
    await views_reflect(hub, last)
    child = hub.views.pid
    assert child is not None
    os.kill(child, signal.SIGSTOP)
    try:
        for _ in range(3):  # appends one after the other: the first fills the pipe
            last = await heartbeats(nc, 1000)
            await eventually(lambda seq=last: hub.progress.ingested_seq >= seq, timeout=30)
        assert hub.metrics.get("views_process_gaps") >= 1
        assert not any(hub.progress.reflects(p.name, last) for p in hub.projections)
    finally:
        os.kill(child, signal.SIGCONT)
    await views_reflect(hub, last)
    for p in hub.projections:
        assert hub.metrics.get(f"projection_tail_overflows:{p.name}") >= 1, p.name
    assert hub.views.restarts == 0
    await verified(hub, hub_config)


async def test_the_views_process_ends_with_the_hub(hub_config, nc, tmp_path):
    """SIGKILL the hub process: its views process sees its input end and exits."""
    hub = HubProcess(hub_config, tmp_path / "hub.log")
    hub.start()
    try:
        assert hub.proc is not None
        # (The hub's other children are its query servers.)
        child = await eventually(lambda: child_running(hub.proc.pid, "hub.views_process"),
                                 timeout=60)  # fmt: skip
        hub.kill()
        await eventually(lambda: not alive(child), timeout=30)
    finally:
        hub.stop()


async def test_a_views_process_that_cannot_be_started_is_tried_again(
    start_hub, hub_config, nc, monkeypatch
):
    """The child dies and the first attempt to start another fails (no process: the
    failure is injected, the rest is real): the hub tries again and the views catch up."""
    hub = await start_hub(infra_self=False)
    last = await live_traffic(nc)
    await views_reflect(hub, last)
    real = asyncio.create_subprocess_exec
    attempts = []

    async def fails_once(*args, **kwargs):
        attempts.append(args)
        if len(attempts) == 1:
            raise OSError("injected: no process could be started")
        return await real(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", fails_once)
    first = hub.views.pid
    os.kill(first, signal.SIGKILL)
    last = await heartbeats(nc, 300, status="unhealthy")
    await eventually(lambda: len(attempts) == 2 and hub.views.pid not in (None, first), timeout=60)
    await views_reflect(hub, last)
    svc2 = await query(nc, "hub.query.instances", {"service_name": "svc-2"})
    assert {i["reported_status"] for i in svc2["data"]} == {"unhealthy"}, svc2
    await verified(hub, hub_config)


async def test_appends_made_while_the_views_process_starts_reach_it_whole(
    start_hub, hub_config, pg, tmp_path
):
    """The hub appends before its views process is ready (here a check result every 0.1 s,
    each superseding the previous one in the log). Those appends reach the projectors from
    the hub, not from the log, so the PostgreSQL journal of check results has the first
    one, which the log no longer holds."""
    from tests.integration.test_infra_monitor import component, write_yaml

    checked = component("cache", hub_config.redis_port, "tcp", 0.1)
    path = write_yaml(tmp_path / "infra.yaml", databases=[checked])
    await start_hub(infra_config=path, infra_self=False)

    async def applied() -> tuple[str, set[str]] | None:
        """The first status change and the journal, once PostgreSQL has five results
        (the log applied in order: the change, which came first, is there too)."""
        first = await pg.fetchval("SELECT event_id FROM infra_history"
                                  " WHERE component = 'cache' ORDER BY ts LIMIT 1")  # fmt: skip
        journal = {r["event_id"] for r in await pg.fetch(
            "SELECT event_id FROM infra_checks WHERE component = 'cache'")}  # fmt: skip
        return (first, journal) if first is not None and len(journal) >= 5 else None

    first, journal = await eventually(applied, timeout=60)
    assert first.endswith(".status")
    assert first.removesuffix(".status") in journal, (first, journal)
