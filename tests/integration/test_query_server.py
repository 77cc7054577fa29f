"""hub.query.* is answered by query-server processes, off the hub's ingest loop: started
and supervised by the hub (or run alone as ``hub query-server``), fed with the hub's
progress for read-your-writes, with bounded work (BUSY at once when full) and a query
timeout (UNAVAILABLE when the view store does not answer)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import msgspec
import nats.errors
import pytest

from tests.integration.conftest import ROOT, HubProcess, alive, child_running, eventually, query
from tests.integration.test_infra_monitor import Watch

REPLY_CODES = {None, "BUSY", "UNAVAILABLE"}


def registration(i: int, service: str = "orders") -> bytes:
    return msgspec.json.encode({"service_name": service, "instance_id": f"i-{i}",
                                "host": "10.0.0.1", "port": 1000 + i % 60000})  # fmt: skip


async def register(nc, *regs: bytes) -> int:
    """Publish registrations (acknowledged); the last ingress sequence."""
    js = nc.jetstream()
    futures = [await js.publish_async("hub.register", r) for r in regs]
    return max(a.seq for a in await asyncio.gather(*futures))


async def status(nc) -> dict:
    reply = await query(nc, "hub.query.status", {})
    assert reply["success"], reply
    return reply["data"]


async def served(nc, service: str, instance: str, seq: int) -> dict:
    """``hub.query.service`` with ``min_seq``, asked again while the answer is BUSY."""
    while True:
        reply = await query(nc, "hub.query.service", {"service_name": service, "min_seq": seq},
                            timeout=30)  # fmt: skip
        if reply["error_code"] != "BUSY":
            break
        await asyncio.sleep(0.05)
    assert reply["success"], reply
    assert instance in {i["instance_id"] for i in reply["data"]["instances"]}, reply
    return reply


async def test_queries_are_answered_by_a_query_server_the_hub_runs(start_hub, nc):
    """The hub answers no query itself: a query-server process does (a child of the hub,
    named by hub.query.status), with read-your-writes through min_seq for each of a run
    of registrations asked at once; stopping the hub stops its query server."""
    hub = await start_hub(infra_self=False)
    (server,) = hub.query_servers.pids
    assert server != os.getpid() and alive(server)
    s = await status(nc)
    assert s["query_server"]["pid"] == server, s
    assert s["pid"] == os.getpid()  # the hub's own snapshot, passed on
    assert s["status"] == "HEALTHY" and s["hub_heard_s_ago"] is not None, s
    assert s["query_servers"] == {"configured": 1, "pids": [server], "restarts": 0}, s
    assert {"pending", "messages", "recorded_through", "lease_decisions"} <= set(s["ingress"])
    for i in range(20):
        seq = await register(nc, registration(i))
        reply = await query(nc, "hub.query.service", {"service_name": "orders", "min_seq": seq})
        assert reply["success"], reply
        assert f"i-{i}" in {x["instance_id"] for x in reply["data"]["instances"]}, reply
    await hub.stop()
    assert not alive(server)


async def test_hub_query_server_runs_alone_next_to_a_hub_without_its_own(
    start_hub, hub_config, nc, tmp_path
):
    """With HUB_QUERY_SERVERS=0 nobody answers queries (the hub does not subscribe);
    `hub query-server`, configured from the environment, answers them, read-your-writes
    included (for a registration made before it started, the hub idle since, too). With
    the hub gone it still answers, DEGRADED ("hub not heard from for N s") and replies
    marked as maybe stale; it ends on SIGTERM."""
    hub = await start_hub(query_servers=0, infra_self=False)
    assert hub.query_servers.pids == []
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request("hub.query.services", b"{}", timeout=5)
    before = await register(nc, registration(0, "alone"))
    await eventually(lambda: hub.progress.reflects("redis-registry", before))
    env = {**os.environ, **hub_config.to_env(), "HUB_QUERY_SERVERS": "0"}
    log_path = tmp_path / "query-server.log"
    with log_path.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hub", "query-server", cwd=ROOT, env=env, stdout=out, stderr=out
        )
    try:

        async def answers() -> dict | None:
            try:
                reply = await nc.request("hub.query.status", b"{}", timeout=5)
            except nats.errors.NoRespondersError:
                return None
            return msgspec.json.decode(reply.data)

        reply = await eventually(answers, timeout=60)
        assert reply["data"]["query_server"]["pid"] == proc.pid, reply
        await served(nc, "alone", "i-0", before)
        seq = await register(nc, registration(1, "alone"))
        await served(nc, "alone", "i-1", seq)
        assert (await status(nc))["status"] == "HEALTHY"

        await hub.stop()

        async def stale() -> dict | None:
            s = await status(nc)
            return s if s["status"] == "DEGRADED" else None

        s = await eventually(stale, timeout=30)
        assert any(p.startswith("hub not heard from for") for p in s["problems"]), s
        assert s["hub_heard_s_ago"] >= 3, s  # rounded to the millisecond
        reply = await query(nc, "hub.query.service", {"service_name": "alone"})
        assert reply["success"] and "hub not heard from" in reply["metadata"]["degraded"], reply
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_storm_of_queries_is_answered_or_refused_at_once(start_hub, nc):
    """Three hundred askers each asking hub.query.services for all of 3,000 instances
    (the largest page) again and again (after a pause when refused) while heartbeats flow:
    every request gets a reply before its (generous) timeout, a success or BUSY (never
    UNAVAILABLE for a store that answers, never INTERNAL_ERROR), and some succeed;
    registrations published during the storm are served with min_seq."""
    await start_hub(infra_self=False)
    instances = 3000
    last = await register(nc, *(registration(i, f"svc-{i % 10}") for i in range(instances)))
    await served(nc, "svc-0", "i-0", last)
    storming = True
    replies: list[dict] = []

    async def heartbeats() -> None:
        js = nc.jetstream()
        k = 0
        while storming:
            batch = [await js.publish_async("hub.heartbeat", msgspec.json.encode(
                {"service_name": f"svc-{i % 10}", "instance_id": f"i-{i}", "load": k % 7 / 7}))
                for i in ((k + j) % instances for j in range(100))]  # fmt: skip
            await asyncio.gather(*batch)
            k += 100
            await asyncio.sleep(0.05)

    async def asker(i: int) -> None:
        pause = random.Random(i)
        while storming:
            reply = await query(nc, "hub.query.services", {"limit": 5000}, timeout=60)
            replies.append(reply)
            if reply["error_code"] == "BUSY":
                await asyncio.sleep(pause.uniform(0.2, 0.5))

    beat = asyncio.create_task(heartbeats())
    askers = [asyncio.create_task(asker(i)) for i in range(300)]
    try:
        for i in range(5):
            seq = await register(nc, registration(i, "late"))
            await served(nc, "late", f"i-{i}", seq)
    finally:
        storming = False
        await asyncio.gather(beat, *askers)
    codes = Counter(r["error_code"] for r in replies)
    assert set(codes) <= {None, "BUSY"}, codes
    assert codes[None] >= 1 and codes["BUSY"] >= 1, codes
    for r in replies:
        if r["success"]:
            assert r["metadata"]["total_instances"] >= instances, r["metadata"]


async def test_a_frozen_view_store_is_unavailable_and_the_monitor_notices(
    start_hub, nc, redis_server
):
    """Valkey SIGSTOPped: each query is answered UNAVAILABLE (a reply, not a hang: the
    asker's own timeout is generous), hub.query.status still answers, and the monitor
    records hub-redis UNHEALTHY; SIGCONT: queries succeed again."""
    watch = Watch()
    await watch.start(nc)
    await start_hub()
    seq = await register(nc, registration(1))
    await served(nc, "orders", "i-1", seq)
    await eventually(lambda: ("UNKNOWN", "HEALTHY") in watch.of("hub-redis"), timeout=60)
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        one = await query(nc, "hub.query.services", {}, timeout=60)
        assert one["error_code"] == "UNAVAILABLE", one
        assert one["error_message"], one
        several = await asyncio.gather(*(
            query(nc, f"hub.query.{kind}", body, timeout=60)
            for kind, body in [("services", {}), ("service", {"service_name": "orders"}),
                               ("instances", {"service_name": "orders"}), ("health", {}),
                               ("infrastructure", {})] * 3
        ))  # fmt: skip
        assert {r["error_code"] for r in several} <= {"UNAVAILABLE", "BUSY"}, several
        assert "UNAVAILABLE" in {r["error_code"] for r in several}
        assert (await status(nc))["status"]  # answered from memory
        await eventually(lambda: ("HEALTHY", "UNHEALTHY") in watch.of("hub-redis"), timeout=60)
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)

    async def back() -> bool:
        reply = await query(nc, "hub.query.services", {}, timeout=60)
        return bool(reply["success"])

    await eventually(back, timeout=60)
    await eventually(lambda: ("UNHEALTHY", "HEALTHY") in watch.of("hub-redis"), timeout=60)


async def test_a_killed_query_server_is_replaced_and_no_query_hangs(start_hub, nc):
    """SIGKILL the query server while four askers query in a loop: each query ends with a
    reply (a success, or BUSY/UNAVAILABLE) or no responders, or, for one that was with
    the killed process, with its asker's own timeout; none outlives it. The hub starts
    another query server (counted in hub.query.status), which serves."""
    hub = await start_hub(infra_self=False)
    seq = await register(nc, registration(1))
    await served(nc, "orders", "i-1", seq)
    (first,) = hub.query_servers.pids
    outcomes: Counter[str] = Counter()
    running = True

    async def asker() -> None:
        while running:
            try:
                # The guard is longer than the request's timeout: it firing is a hang.
                reply = await asyncio.wait_for(
                    nc.request("hub.query.services", b"{}", timeout=3), timeout=10
                )
                data = msgspec.json.decode(reply.data)
                assert data["error_code"] in REPLY_CODES, data
                outcomes[data["error_code"] or "success"] += 1
            except nats.errors.NoRespondersError:
                outcomes["no responders"] += 1
                await asyncio.sleep(0.05)
            except nats.errors.TimeoutError:  # taken by the process that was killed
                outcomes["timed out"] += 1

    askers = [asyncio.create_task(asker()) for _ in range(4)]
    try:
        await eventually(lambda: outcomes["success"] >= 20, timeout=60)
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: hub.query_servers.restarts == 1 and len(hub.query_servers.pids)
                         == 1 and hub.query_servers.pids[0] != first, timeout=60)  # fmt: skip
        before = outcomes["success"]
        await eventually(lambda: outcomes["success"] >= before + 20, timeout=60)
    finally:
        running = False
        await asyncio.gather(*askers)
    assert not alive(first)
    # Only what the killed process had taken: at most one request per asker.
    assert outcomes["timed out"] <= len(askers), outcomes
    s = await status(nc)
    assert s["query_server_restarts"] == 1 and s["restarts"]["query-server"] == 1, s
    assert s["query_server"]["pid"] == hub.query_servers.pids[0] != first, s


async def test_the_query_server_ends_with_the_hub(hub_config, tmp_path):
    """SIGKILL the hub process (`hub run`): its query server and its views process end
    with it (each sees its stdin end, or, still starting, is killed by the kernel)."""
    hub = HubProcess(hub_config, tmp_path / "hub.log")
    hub.start()
    try:
        assert hub.proc is not None
        server = await eventually(lambda: child_running(hub.proc.pid, "hub.query_server"),
                                  timeout=60)  # fmt: skip
        views = child_running(hub.proc.pid, "hub.views_process")
        assert views is not None
        hub.kill()
        await eventually(lambda: not alive(server) and not alive(views), timeout=30)
    finally:
        hub.stop()


def test_a_child_still_starting_dies_with_the_hub(tmp_path):
    """A child that never reads its stdin (one stuck connecting, say) still ends when the
    process that started it is SIGKILLed: the kernel kills it (die_with_parent). Without
    die_with_parent it is left running, adopted by init (checked too)."""
    child = (
        "import os, sys, time\n"
        "from hub.children import die_with_parent\n"
        "if sys.argv[1] == 'yes':\n"
        "    die_with_parent()\n"
        "print(os.getpid(), flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = (
        "import subprocess, sys, time\n"
        "from hub.children import child_env\n"
        "p = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], env=child_env(),\n"
        "                     stdout=sys.stdout)\n"
        "time.sleep(120)\n"
    )  # fmt: skip
    for dies in ("yes", "no"):
        proc = subprocess.Popen(  # the hub's place
            [sys.executable, "-c", parent, child, dies], cwd=ROOT, stdout=subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            pid = int(proc.stdout.readline())
            assert alive(pid)
            proc.kill()
            proc.wait()
            deadline = time.monotonic() + 30
            while alive(pid) and dies == "yes" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert alive(pid) == (dies == "no"), dies
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            with contextlib.suppress(ProcessLookupError, NameError):
                os.kill(pid, signal.SIGKILL)
