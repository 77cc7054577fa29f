"""Liveness on real servers: leases, health transitions pushed to watchers, flapping,
self-preservation; after each, replay rebuilds the same views from the log."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import pytest

from tests.integration.conftest import eventually, query
from tests.integration.test_replay import eventually_equal, replay_reproduces_the_views

# Short enough for quick tests, long enough for a loaded two-core machine (the hub and
# these heartbeating instances share one event loop).
INTERVAL = 0.5
# How long to wait for a condition before failing: a guard against hanging, never a
# speed target (how soon the hub decides is checked on the times it records).
PATIENCE = 30.0


class Fleet:
    """Instances of one service that register and heartbeat like real services would
    (plain nats-py, durable publish: the PubAck is the receipt)."""

    def __init__(self, nc, service: str = "orders", interval: float = INTERVAL) -> None:
        self.js = nc.jetstream()
        self.service = service
        self.interval = interval
        self.tasks: dict[str, asyncio.Task] = {}
        self.status: dict[str, str] = {}
        self.stopping: set[str] = set()

    async def register(self, ids: list[str], **lease) -> int:
        seq = 0
        for i in ids:
            body = {"service_name": self.service, "instance_id": i, "host": "10.1.0.1",
                    "port": 8000 + len(self.tasks), "heartbeat_interval_s": self.interval,
                    "version": "2.0", "metadata": {"zone": "a" if i.endswith("1") else "b"},
                    **lease}  # fmt: skip
            seq = (await self.js.publish("hub.register", msgspec.json.encode(body))).seq
        return seq

    async def beat(self, instance: str, status: str = "healthy", load: float = 0.5) -> None:
        body = {"service_name": self.service, "instance_id": instance, "status": status,
                "load": load}  # fmt: skip
        await self.js.publish("hub.heartbeat", msgspec.json.encode(body))

    def start(self, ids: list[str]) -> None:
        for i in ids:
            self.status.setdefault(i, "healthy")
            self.tasks[i] = asyncio.create_task(self._loop(i))

    async def _loop(self, instance: str) -> None:
        while instance not in self.stopping:
            await self.beat(instance, self.status[instance], load=len(instance) / 10)
            await asyncio.sleep(self.interval)

    async def stop(self, ids: list[str] | None = None) -> None:
        """Stop heartbeating (by flag, not by cancel: a cancel can be lost inside
        nats-py's request on Python 3.11, and the loop would go on for ever)."""
        chosen = list(self.tasks) if ids is None else ids
        self.stopping.update(chosen)  # all at once
        tasks = [self.tasks.pop(i) for i in chosen]
        if not tasks:
            return
        _, stuck = await asyncio.wait(tasks, timeout=2 * self.interval + 5)
        for task in stuck:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Watcher:
    """Everything the hub pushes on hub.events.<tenant>.>, in order (each event carries
    the time the hub recorded it, ``ts``: compare those, not receipt times)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []

    async def start(self, nc, tenant: str = "default") -> None:
        async def on(msg) -> None:
            self.seen.append((msg.subject.rsplit(".", 1)[-1], msgspec.json.decode(msg.data)))

        await nc.subscribe(f"hub.events.{tenant}.>", cb=on)
        await nc.flush()

    def of(self, kind: str, instance: str | None = None) -> list[dict]:
        return [
            e for k, e in self.seen
            if k == kind and (instance is None or e.get("instance_id") == instance)
        ]  # fmt: skip

    def about(self, instance: str) -> list[str]:
        """The kinds of health events about one instance, in order."""
        return [k for k, e in self.seen
                if e.get("instance_id") == instance and k != "registered"]  # fmt: skip


async def instances(nc, **q) -> dict[str, dict]:
    reply = await query(nc, "hub.query.instances", {"service_name": "orders", **q})
    assert reply["success"], reply
    return {i["instance_id"]: i for i in reply["data"]}


async def test_a_silent_instance_goes_critical_within_ttl_then_expires_into_history(
    start_hub, event_log_kind, hub_config, nc, pg, rds
):
    """Three instances heartbeat; one stops. Within TTL + 1 s it is critical in
    hub.query.instances and a transition is pushed on hub.events; after the expiry time
    it is gone from the live view and in the PostgreSQL history; the other two were never
    affected. Then replay rebuilds the same views. (The times are those the hub recorded:
    the test's own clock would add the projection, the query and its polling.)"""
    hub = await start_hub()
    watcher = Watcher()
    await watcher.start(nc)
    fleet = Fleet(nc)
    ids = ["orders-1", "orders-2", "orders-3"]
    ttl, expire_after = 3 * INTERVAL, 1.5
    seq = await fleet.register(ids, expire_after_s=expire_after)
    fleet.start(ids)
    live = await instances(nc, min_seq=seq)
    assert set(live) == set(ids) and all(i["status"] == "healthy" for i in live.values())
    assert live["orders-2"]["ttl_s"] == ttl and live["orders-2"]["expire_after_s"] == expire_after
    await asyncio.sleep(4 * INTERVAL)

    await fleet.stop(["orders-2"])

    async def critical() -> bool:
        return (await instances(nc))["orders-2"]["status"] == "critical"

    await eventually(critical, timeout=PATIENCE, interval=0.05)
    # The push and the view are separate paths: each is awaited, neither assumed first.
    change = await eventually(lambda: watcher.of("health_changed", "orders-2"), timeout=PATIENCE)
    assert change[0]["status"] == "critical" and change[0]["previous"] == "healthy"
    assert "no heartbeat" in change[0]["reason"]
    # Decided after the TTL, within one second of it: the silence it recorded.
    silent = change[0]["ts"] - change[0]["last_seen"]
    assert ttl < silent <= ttl + 1.0, f"critical after {silent:.2f} s of silence (ttl {ttl})"
    healthy_only = await instances(nc, healthy_only=True)
    assert set(healthy_only) == {"orders-1", "orders-3"}

    async def gone() -> bool:
        return "orders-2" not in await instances(nc)

    await eventually(gone, timeout=PATIENCE, interval=0.1)
    expired = await eventually(lambda: watcher.of("expired", "orders-2"), timeout=PATIENCE)
    # Not before the expiry time: critical since the change, for expire_after_s.
    assert expired[0]["critical_since"] == change[0]["ts"]
    assert expired[0]["ts"] - expired[0]["critical_since"] >= expire_after
    expired_sql = "SELECT count(*) FROM health_history WHERE status = 'expired'"
    await eventually(lambda: pg.fetchval(expired_sql), timeout=PATIENCE)
    history = await pg.fetch(
        "SELECT kind, previous, status FROM health_history WHERE instance_id = 'orders-2'"
        " ORDER BY ts"
    )
    assert [tuple(r) for r in history] == [
        ("health_changed", "healthy", "critical"),
        ("expired", "critical", "expired"),
    ]
    row = await pg.fetchrow("SELECT status FROM service_registry WHERE instance_id = 'orders-2'")
    assert row["status"] == "expired"  # kept in the registry's history
    # The others never noticed.
    assert watcher.about("orders-1") == watcher.about("orders-3") == []
    live = await instances(nc)
    assert {i: live[i]["status"] for i in live} == {"orders-1": "healthy", "orders-3": "healthy"}
    health = await query(nc, "hub.query.health", {})
    assert health["data"]["status"] == "HEALTHY"

    await fleet.stop()
    await replay_reproduces_the_views(hub, hub_config, pg, rds)


async def test_discovery_filters_and_picks(start_hub, nc):
    """hub.query.instances: version and metadata filters, healthy_only, and one
    instance by round_robin (in turn), least_load and random."""
    await start_hub()
    fleet = Fleet(nc)
    # A TTL no run outlasts: these instances beat once, and going critical half-way
    # (1.5 s after that beat by default) would change what discovery offers.
    seq = await fleet.register(["orders-1", "orders-2", "orders-3"], ttl_s=600.0)
    await query(nc, "hub.query.instances", {"service_name": "orders", "min_seq": seq})
    for i, (status, load) in enumerate([("healthy", 0.9), ("healthy", 0.2), ("degraded", 0.1)]):
        await fleet.beat(f"orders-{i + 1}", status, load)
    ack = await fleet.js.publish("hub.register", msgspec.json.encode({
        "service_name": "orders", "instance_id": "orders-4", "host": "10.1.0.4", "port": 1,
        "version": "3.0"}))  # fmt: skip

    got = await instances(nc, min_seq=ack.seq)
    assert set(got) == {"orders-1", "orders-2", "orders-3", "orders-4"}
    assert set(await instances(nc, version="3.0")) == {"orders-4"}
    assert set(await instances(nc, metadata={"zone": "a"})) == {"orders-1"}
    assert set(await instances(nc, healthy_only=True)) == {"orders-1", "orders-2", "orders-4"}
    least = await instances(nc, healthy_only=True, version="2.0", pick="least_load")
    assert list(least) == ["orders-2"]
    turns = [next(iter(await instances(nc, healthy_only=True, pick="round_robin")))
             for _ in range(6)]  # fmt: skip
    assert turns == ["orders-1", "orders-2", "orders-4"] * 2
    picked = {next(iter(await instances(nc, pick="random"))) for _ in range(40)}
    assert len(picked) >= 3  # all four are candidates; 40 draws miss one with p < 1e-4
    none = await query(nc, "hub.query.instances",
                       {"service_name": "orders", "version": "9", "pick": "random"})  # fmt: skip
    assert none["error_code"] == "NOT_FOUND"
    bad = await query(nc, "hub.query.instances", {"service_name": "orders", "pick": "fastest"})
    assert bad["error_code"] == "INVALID_REQUEST" and "pick" in bad["error_message"]
    health = await query(nc, "hub.query.health", {})
    assert health["data"]["status"] == "DEGRADED"
    [svc] = health["data"]["services"]
    assert (svc["status"], svc["by_status"]) == ("DEGRADED", {"healthy": 3, "degraded": 1})


async def test_a_flapping_instance_is_one_event_not_a_flood(start_hub, hub_config, nc, pg, rds):
    """An instance alternating healthy/unhealthy quickly: a few transitions, one
    FlappingStarted, then silence; once stable for the quiet time, one FlappingEnded."""
    hub = await start_hub(flap_threshold=4, flap_window_s=30.0, flap_quiet_s=2.0)
    watcher = Watcher()
    await watcher.start(nc)
    fleet = Fleet(nc, interval=0.1)
    seq = await fleet.register(["orders-1", "orders-2"], ttl_s=3.0)
    # Beating from the registration on: the leases run from there, while the views may
    # take seconds to reflect it (a views process starting on a busy machine).
    fleet.start(["orders-1", "orders-2"])
    await instances(nc, min_seq=seq)
    for n in range(30):  # 30 changes in 3 s
        fleet.status["orders-1"] = "unhealthy" if n % 2 == 0 else "healthy"
        await asyncio.sleep(0.1)
    fleet.status["orders-1"] = "healthy"
    await eventually(lambda: watcher.of("flapping_started", "orders-1"), timeout=PATIENCE)

    async def flapping_in_view() -> bool:
        return (await instances(nc))["orders-1"]["flapping"] is True

    await eventually(flapping_in_view, timeout=PATIENCE)
    assert "orders-1" not in await instances(nc, healthy_only=True)

    await eventually(lambda: watcher.of("flapping_ended", "orders-1"), timeout=PATIENCE)
    about = watcher.about("orders-1")
    assert about == ["health_changed"] * 3 + ["flapping_started", "flapping_ended"], about
    assert watcher.of("flapping_ended", "orders-1")[0]["status"] == "healthy"

    async def steady() -> bool:
        i = (await instances(nc))["orders-1"]
        return (i["flapping"], i["status"]) == (False, "healthy")

    await eventually(steady, timeout=PATIENCE)
    assert watcher.about("orders-2") == []

    async def last_two_kinds() -> list[str]:  # PostgreSQL follows the log on its own
        kinds = await pg.fetch(
            "SELECT kind FROM health_history WHERE instance_id = 'orders-1' ORDER BY ts"
        )
        return [r["kind"] for r in kinds][-2:]

    await eventually_equal(last_two_kinds, ["flapping_started", "flapping_ended"])

    await fleet.stop()
    await replay_reproduces_the_views(hub, hub_config, pg, rds)


async def test_self_preservation_holds_expiry_for_a_bounded_time(
    start_hub, hub_config, nc, pg, rds
):
    """Eight of ten instances stop at once: they go critical (honestly), but instead of
    a mass expiry the hub records SelfPreservationStarted, keeps them marked at risk
    (still offered by healthy_only discovery, after the healthy ones), and ends it by
    itself after the bound; then they expire."""
    bound = 3.0
    hub = await start_hub(preservation_max_s=bound, preservation_share=0.5, preservation_min=3)
    watcher = Watcher()
    await watcher.start(nc)
    fleet = Fleet(nc)
    ids = [f"orders-{n}" for n in range(10)]
    seq = await fleet.register(ids, expire_after_s=1.0)
    fleet.start(ids)  # from the registration on: the leases run from there, not from the view
    await instances(nc, min_seq=seq)
    await asyncio.sleep(4 * INTERVAL)
    await fleet.stop(ids[2:])

    started = await eventually(lambda: watcher.of("self_preservation_started"), timeout=PATIENCE)
    assert (started[0]["critical"], started[0]["live"]) == (8, 10)
    assert watcher.of("expired") == []

    async def at_risk_in_view() -> bool:  # the view applies what the watchers were told
        return {i for i, v in (await instances(nc)).items() if v["at_risk"]} == set(ids[2:])

    await eventually(at_risk_in_view, timeout=PATIENCE)
    offered = list(await instances(nc, healthy_only=True))
    assert offered[:2] == ids[:2] and set(offered[2:]) == set(ids[2:])  # at risk, after
    assert next(iter(await instances(nc, healthy_only=True, pick="random"))) in ids[:2]
    health = await query(nc, "hub.query.health", {})
    assert health["data"]["self_preservation"] is not None

    ended = await eventually(lambda: watcher.of("self_preservation_ended"), timeout=PATIENCE)
    assert ended[0]["reason"] == "bound_reached"
    # Ended by itself at the bound, on the times the hub recorded (not receipt times):
    # not before the start + bound, and within one second of it.
    began, end = started[0], ended[0]
    assert began["until"] == pytest.approx(began["ts"] + bound)
    assert began["until"] <= end["ts"] <= began["until"] + 1.0, (began, end)
    await eventually(lambda: len(watcher.of("expired")) == 8, timeout=PATIENCE)
    assert min(e["ts"] for e in watcher.of("expired")) >= end["ts"]  # none expired before

    async def only_the_two() -> bool:  # the view applies what the watchers were told
        return set(await instances(nc)) == set(ids[:2])

    await eventually(only_the_two, timeout=PATIENCE)
    assert (await query(nc, "hub.query.health", {}))["data"]["self_preservation"] is None
    assert len(watcher.of("self_preservation_started")) == 1

    await fleet.stop()
    await replay_reproduces_the_views(hub, hub_config, pg, rds)
