"""The event log stalls while heartbeats keep arriving in ingress: no false criticals, health
history in time order, and the hub says so while it lasts.

Kafka is SIGKILLed (then started again) or SIGSTOPped (then continued); the JetStream log
stops capturing its subjects (what a missing or unavailable stream looks like to a
publisher). Each outage is longer than the instances' TTL; their heartbeats wait in the
ingress stream all along, so no instance may be recorded critical.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import defaultdict

import msgspec
import pytest

from events.model import (
    FlappingEnded,
    FlappingStarted,
    InstanceExpired,
    InstanceHealthChanged,
    SelfPreservationStarted,
)
from hub.bootstrap import make_event_log
from tests.integration.conftest import eventually, query

INSTANCES = 40
TTL_S = 3.0
OUTAGE_S = 3 * TTL_S  # longer than the TTL by far


class Fleet:
    """Instances that heartbeat every second through JetStream (PubAck'd: in ingress)."""

    def __init__(self, nc, *, ttl_s: float = TTL_S) -> None:
        self.js = nc.jetstream()
        self.ttl_s = ttl_s
        self.running = True
        self.sent = 0
        self.failed = 0
        self.health = {i: "healthy" for i in range(INSTANCES)}

    async def register(self) -> int:
        seq = 0
        for i in range(INSTANCES):
            body = {"service_name": f"svc-{i % 4}", "instance_id": f"i-{i}", "host": "10.0.0.1",
                    "port": 1000 + i, "heartbeat_interval_s": 1, "ttl_s": self.ttl_s,
                    "expire_after_s": 600}  # fmt: skip
            seq = (await self.js.publish("hub.register", msgspec.json.encode(body))).seq
        return seq

    async def beat(self) -> None:
        while self.running:
            try:  # as a service's heartbeat loop would: a failed round is not the end
                for i in range(INSTANCES):
                    body = {"service_name": f"svc-{i % 4}", "instance_id": f"i-{i}",
                            "status": self.health[i]}  # fmt: skip
                    await self.js.publish("hub.heartbeat", msgspec.json.encode(body), timeout=1)
                    self.sent += 1
            except Exception:
                self.failed += 1
            await asyncio.sleep(1.0)


async def status(nc) -> dict:
    reply = await query(nc, "hub.query.status", {}, timeout=5)
    assert reply["success"], reply
    return reply["data"]


def _kafka_down(kafka_server, how: str):
    pid = kafka_server.pid
    assert pid is not None
    if how == "kill":
        os.kill(pid, signal.SIGKILL)
        kafka_server._proc.wait()  # reaped, so that start() spawns a new broker
    else:
        os.kill(pid, signal.SIGSTOP)


async def _kafka_up(kafka_server, how: str) -> None:
    if how == "kill":
        await asyncio.to_thread(kafka_server.start, 120)
    else:
        os.kill(kafka_server.pid, signal.SIGCONT)


async def _jetstream_capture(nc, on: bool) -> None:
    """Let HUB_EVENTS capture hub.log.> again (on), or nothing the hub publishes (off)."""
    js = nc.jetstream()
    config = (await js.stream_info("HUB_EVENTS")).config
    config.subjects = ["hub.log.>"] if on else ["hub.log-unavailable.>"]
    await js.update_stream(config)


@pytest.mark.parametrize("fault", ["kafka-kill", "kafka-stop", "jetstream-unwritable"])
async def test_a_log_outage_longer_than_the_ttl_raises_no_false_criticals(
    request, start_hub, hub_config, nc, pg, fault
):
    """The log cannot be written for 3 x TTL while 40 instances heartbeat into ingress.
    While it lasts the hub says so on its own (hub.query.status DEGRADED naming the log,
    a hub.events._hub.log_stalled notice, query replies marked degraded, the backlog
    reported). Four instances report `degraded` during the outage and `healthy` after it.
    Afterwards: zero criticals, expiries or self-preservation recorded; those four have
    exactly their two changes, and every instance's health history is in time order in
    the log and in PostgreSQL; the status is healthy again."""
    kind = "jetstream" if fault.startswith("jetstream") else "kafka"
    kafka_server = request.getfixturevalue("kafka_server") if kind == "kafka" else None
    hub = await start_hub(event_log=kind, infra_self=False, log_stall_s=0.5, **(
        {"kafka_brokers": (kafka_server.bootstrap,),
         "kafka_topic": request.getfixturevalue("kafka_topic")} if kafka_server else {}
    ))  # fmt: skip
    notices: list[dict] = []

    async def on_notice(msg) -> None:
        notices.append(msgspec.json.decode(msg.data))

    await nc.subscribe("hub.events._hub.>", cb=on_notice)
    fleet = Fleet(nc)
    last = await fleet.register()
    assert (await query(nc, "hub.query.services", {"min_seq": last}))["success"]
    beating = asyncio.create_task(fleet.beat())
    try:
        await asyncio.sleep(2)
        healthy = await status(nc)
        assert healthy["status"] == "HEALTHY", healthy
        assert healthy["event_log"]["writable"] is True

        # The outage.
        if kind == "kafka":
            _kafka_down(kafka_server, fault.removeprefix("kafka-"))
        else:
            await _jetstream_capture(nc, on=False)
        changing = range(4)
        for i in changing:
            fleet.health[i] = "degraded"
        restored = False
        try:
            degraded = await eventually(lambda: _degraded(nc), timeout=OUTAGE_S, interval=0.2)
            assert degraded["event_log"]["writable"] is False
            assert any(kind in p for p in degraded["problems"]), degraded
            assert degraded["ingress"]["messages"] >= 0  # the backlog is a reported figure
            await eventually(lambda: any(n["type"] == "log_stalled" for n in notices))
            reply = await query(nc, "hub.query.health", {})
            assert "degraded" in reply["metadata"], reply  # answers say they may be stale
            await asyncio.sleep(OUTAGE_S)
            waiting = await status(nc)
            assert waiting["ingress"]["messages"] > 0, waiting  # heartbeats wait in ingress
            assert waiting["ingress"]["oldest_age_s"] > 0, waiting
        finally:
            if kind == "kafka":
                await _kafka_up(kafka_server, fault.removeprefix("kafka-"))
            else:
                await _jetstream_capture(nc, on=True)
            restored = True
        assert restored

        # Back: the backlog is recorded, the hub healthy, then several TTLs of normal life.
        await eventually(lambda: _healthy(nc), timeout=120, interval=0.5)
        for i in changing:
            fleet.health[i] = "healthy"
        await eventually(lambda: any(n["type"] == "log_recovered" for n in notices))
        await asyncio.sleep(3 * TTL_S)
    finally:
        fleet.running = False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(beating, 30)
    assert fleet.sent > INSTANCES * 5

    # What was recorded: no lease decision against the fleet, history in time order.
    log = make_event_log(hub.config, nc, read_only=True)
    await log.start()
    per_instance: dict[str, list] = defaultdict(list)
    lease_decisions = []
    async for records in log.read(None, follow=False):
        for r in records:
            e = r.event
            if isinstance(e, InstanceHealthChanged | FlappingStarted | FlappingEnded |
                          InstanceExpired):  # fmt: skip
                per_instance[e.instance_id].append(e)
                if isinstance(e, InstanceExpired) or getattr(e, "status", "") == "critical":
                    lease_decisions.append(e)
            if isinstance(e, SelfPreservationStarted):
                lease_decisions.append(e)
    await log.close()
    assert lease_decisions == [], lease_decisions[:5]
    assert sorted(per_instance) == [f"i-{i}" for i in changing], per_instance
    for events in per_instance.values():
        assert [(e.previous, e.status) for e in events] == [
            ("healthy", "degraded"),
            ("degraded", "healthy"),
        ], events
        assert [e.ts for e in events] == sorted(e.ts for e in events), events
    assert hub.metrics.get("lease_decisions_deferred_lagging") > 0
    # PostgreSQL's health history holds the same transitions, in the same order by time.
    await eventually(lambda: all(hub.progress.up_to_date(p.name) for p in hub.projections))
    rows = await pg.fetch("SELECT instance_id, previous, status FROM health_history "
                          "ORDER BY instance_id, ts")  # fmt: skip
    assert [(r["instance_id"], r["previous"], r["status"]) for r in rows] == [
        (instance, e.previous, e.status)
        for instance in sorted(per_instance)
        for e in per_instance[instance]
    ]


async def _degraded(nc) -> dict | None:
    try:
        s = await status(nc)
    except Exception:
        return None
    return s if s["status"] == "DEGRADED" and not s["event_log"]["writable"] else None


async def _healthy(nc) -> bool:
    try:
        s = await status(nc)
    except Exception:
        return False
    return s["status"] == "HEALTHY" and s["ingress"].get("lease_decisions") == "on"


async def test_a_nats_outage_longer_than_the_ttl_raises_no_false_criticals(
    start_hub, hub_config, nats_server
):
    """NATS itself is down for longer than the TTL (stopped, then started on the same store):
    no service could heartbeat, so the silence is the hub's outage, not theirs. The hub's
    connection comes back before the services' (they wait 3 s between reconnects): every
    lease runs from the hub's reconnection, the heartbeats resume within it, and no
    instance is recorded critical."""
    import nats

    ttl_s = 8.0
    # The writer lease lapses during the outage (2 s < 11 s), so the hub must also take
    # it again, and an append may find it lapsed before it is renewed.
    hub = await start_hub(infra_self=False, writer_lease_s=2.0)
    fleet_nc = await nats.connect(nats_server.url, reconnect_time_wait=3,
                                  max_reconnect_attempts=-1)  # fmt: skip
    fleet = Fleet(fleet_nc, ttl_s=ttl_s)
    try:
        last = await fleet.register()
        assert (await query(fleet_nc, "hub.query.services", {"min_seq": last}))["success"]
        beating = asyncio.create_task(fleet.beat())
        await asyncio.sleep(2)
        await asyncio.to_thread(nats_server.stop)
        await asyncio.sleep(ttl_s + 3)
        await asyncio.to_thread(nats_server.start)
        await eventually(lambda: _healthy(fleet_nc), timeout=60, interval=0.5)
        sent = fleet.sent
        await asyncio.sleep(2 * ttl_s)
        assert fleet.sent > sent + INSTANCES  # heartbeats flowed again
        fleet.running = False
        await asyncio.wait_for(beating, 30)
        assert fleet.failed > 0  # it did try to heartbeat while NATS was away

        log = make_event_log(hub.config, fleet_nc, read_only=True)
        await log.start()
        decided = [r.event async for records in log.read(None, follow=False) for r in records
                   if isinstance(r.event, InstanceHealthChanged | InstanceExpired)]  # fmt: skip
        await log.close()
        assert decided == [], decided[:5]
    finally:
        fleet.running = False
        await fleet_nc.close()
