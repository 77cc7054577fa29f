"""The walking skeleton on real servers: register over NATS -> event log -> views -> query."""

from __future__ import annotations

import asyncio
import json

import msgspec

from tests.integration.conftest import query, query_all

REGISTRATIONS = [
    {"service_name": "orders", "instance_id": "orders-1", "host": "10.0.0.5", "port": 8080,
     "protocol": "http", "version": "1.4.2", "metadata": {"region": "eu-1"},
     "transport_preferences": ["nats"], "heartbeat_interval_s": 5, "depends_on": ["payments"]},
    {"service_name": "orders", "instance_id": "orders-2", "host": "10.0.0.6", "port": 8080,
     "version": "1.4.2"},
    {"service_name": "payments", "host": "10.0.1.7", "port": 9090, "version": "2.0.0"},
]  # fmt: skip


async def test_three_instances_of_two_services_show_up_everywhere(
    start_hub, event_log_kind, nc, pg, rds
):
    """Plain nats-py JSON publishes register 3 instances of 2 services; the query, the
    service_registry rows and the Redis keys all show exactly them (per event log)."""
    hub = await start_hub()
    assert hub.event_log.name == event_log_kind
    js = nc.jetstream()
    acks = [await js.publish("hub.register", msgspec.json.encode(r)) for r in REGISTRATIONS]
    min_seq = max(a.seq for a in acks)

    reply = await query(nc, "hub.query.services", {"min_seq": min_seq})
    assert reply["success"] is True, reply
    assert reply["error_code"] is None
    assert isinstance(reply["processing_time_ms"], float)
    assert reply["correlation_id"]
    services = {s["service_name"]: s for s in reply["data"]}
    assert set(services) == {"orders", "payments"}
    assert sorted(i["instance_id"] for i in services["orders"]["instances"]) == [
        "orders-1",
        "orders-2",
    ]
    (payments,) = services["payments"]["instances"]
    # No instance_id given: the hub derived one deterministically.
    assert payments["instance_id"].startswith("payments-")
    o1 = next(i for i in services["orders"]["instances"] if i["instance_id"] == "orders-1")
    assert (o1["host"], o1["port"], o1["version"], o1["status"]) == (
        "10.0.0.5", 8080, "1.4.2", "healthy",
    )  # fmt: skip
    assert o1["metadata"] == {"region": "eu-1"}
    assert o1["last_seen"].endswith("Z")

    # The PostgreSQL registry view: one row per instance with the seed's columns.
    await _wait_views(hub)
    rows = await pg.fetch("SELECT * FROM service_registry ORDER BY service_name, instance_id")
    assert [(r["tenant_id"], r["service_name"], r["instance_id"]) for r in rows] == [
        ("default", "orders", "orders-1"),
        ("default", "orders", "orders-2"),
        ("default", "payments", payments["instance_id"]),
    ]
    r1 = rows[0]
    assert (r1["host"], r1["port"], r1["protocol"], r1["version"], r1["status"]) == (
        "10.0.0.5", 8080, "http", "1.4.2", "healthy",
    )  # fmt: skip
    assert json.loads(r1["metadata"]) == {"region": "eu-1"}
    assert json.loads(r1["transport_preferences"]) == ["nats"]
    assert r1["health_endpoint"] == "/health"
    assert r1["contract_validated"] is False
    assert r1["registered_at"] == r1["last_seen"]

    # The Redis view: the same three instances under hub:default:...
    assert await rds.smembers("hub:default:services") == {"orders", "payments"}
    assert await rds.smembers("hub:default:svc:orders") == {"orders-1", "orders-2"}
    keys = sorted(await rds.keys("hub:default:inst:*"))
    assert keys == sorted(f"hub:default:inst:{r['service_name']}:{r['instance_id']}" for r in rows)
    for row in rows:
        h = await rds.hgetall(f"hub:default:inst:{row['service_name']}:{row['instance_id']}")
        assert (h["host"], int(h["port"]), h["version"], h["status"]) == (
            row["host"], row["port"], row["version"], row["status"],
        )  # fmt: skip
        assert float(h["last_seen"]) == row["last_seen"].timestamp()

    # Filters: by name, by version; tenants are isolated.
    reply = await query(nc, "hub.query.services", {"name": "payments"})
    assert [s["service_name"] for s in reply["data"]] == ["payments"]
    reply = await query(nc, "hub.query.services", {"version": "1.4.2"})
    assert [s["service_name"] for s in reply["data"]] == ["orders"]
    reply = await query(nc, "hub.query.services.acme", {})
    assert reply == {**reply, "success": True, "data": []}
    reply = await query(nc, "hub.query.service", {"service_name": "orders"})
    assert reply["success"] and len(reply["data"]["instances"]) == 2


async def test_registration_is_idempotent_and_tenants_are_separate(start_hub, nc, pg, rds):
    """Registering the same instance twice keeps one row; a tenant subject scopes it."""
    hub = await start_hub()
    js = nc.jetstream()
    body = msgspec.json.encode(REGISTRATIONS[2])
    await js.publish("hub.register", body)
    await js.publish("hub.register", body)
    ack = await js.publish("hub.register.acme", body)
    reply = await query(nc, "hub.query.services.acme", {"min_seq": ack.seq})
    assert [s["service_name"] for s in reply["data"]] == ["payments"]
    await _wait_views(hub)
    rows = await pg.fetch("SELECT tenant_id, instance_id FROM service_registry ORDER BY 1")
    assert [r["tenant_id"] for r in rows] == ["acme", "default"]
    assert rows[0]["instance_id"] == rows[1]["instance_id"]


async def test_heartbeat_and_deregistration_reach_both_views(start_hub, nc, pg, rds):
    """A heartbeat updates status and last_seen; deregistration leaves the live view and
    marks the PostgreSQL row 'deregistered' (history is kept)."""
    hub = await start_hub()
    js = nc.jetstream()
    await js.publish("hub.register", msgspec.json.encode(REGISTRATIONS[0]))
    ack = await js.publish(
        "hub.heartbeat",
        b'{"service_name":"orders","instance_id":"orders-1","status":"degraded","load":0.7}',
    )
    reply = await query(nc, "hub.query.service", {"service_name": "orders", "min_seq": ack.seq})
    (inst,) = reply["data"]["instances"]
    assert (inst["status"], inst["load"]) == ("degraded", 0.7)
    assert reply["data"]["status"] == "unhealthy"  # no healthy instance left
    ack = await js.publish("hub.deregister", b'{"service_name":"orders","instance_id":"orders-1"}')
    reply = await query(nc, "hub.query.services", {"min_seq": ack.seq})
    assert reply["data"] == []
    assert await rds.exists("hub:default:inst:orders:orders-1") == 0
    assert await rds.smembers("hub:default:services") == set()
    await _wait_views(hub)
    row = await pg.fetchrow("SELECT status, load FROM service_registry")
    assert (row["status"], row["load"]) == ("deregistered", 0.7)


async def _wait_views(hub) -> None:
    """Wait until both projections reflect everything ingested so far."""
    from tests.integration.conftest import eventually

    seq = hub.progress.ingested_seq
    await eventually(lambda: all(hub.progress.reflects(p.name, seq) for p in hub.projections))


async def test_large_registries_are_paged_and_every_page_fits(start_hub, nc):
    """Queries page by instance with a cursor; pages that would exceed the NATS max
    payload shrink on their own; following next_cursor lists every instance once."""
    await start_hub()
    js = nc.jetstream()
    big = "m" * 7000  # 200 instances x 7 KB of metadata > the 1 MiB max payload
    futures = [
        await js.publish_async(
            "hub.register",
            msgspec.json.encode(
                {
                    "service_name": f"svc-{i % 7}",
                    "instance_id": f"i-{i:03d}",
                    "host": "10.0.0.1",
                    "port": 1000 + i,
                    "metadata": {"m": big},
                }
            ),
        )
        for i in range(200)
    ]
    acks = await asyncio.gather(*futures)
    min_seq = max(a.seq for a in acks)
    first = await query(nc, "hub.query.services", {"min_seq": min_seq})
    assert first["success"], first
    assert first["metadata"]["total_instances"] == 200
    page = sum(len(s["instances"]) for s in first["data"])
    assert 0 < page < 200 and first["metadata"]["next_cursor"]
    listed = await query_all(nc, "hub.query.services", {"limit": 50})
    assert sorted(i["instance_id"] for i in listed) == [f"i-{i:03d}" for i in range(200)]
    small = await query_all(nc, "hub.query.services", {"limit": 7, "name": "svc-3"})
    assert [i["instance_id"] for i in small] == [f"i-{i:03d}" for i in range(3, 200, 7)]
    bad = await query(nc, "hub.query.services", {"cursor": "no-slash"})
    assert bad["error_code"] == "INVALID_REQUEST"
