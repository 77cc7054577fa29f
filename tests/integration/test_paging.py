"""Queries page through the Redis view's index: each page costs what it returns.

``hub.query.services`` / ``service`` / ``instances`` walk the tenant's instances in
(service, instance) order after a cursor, filters applied while scanning (a page may
end short, with a cursor, when the scan budget is spent), cut at the reply's byte
budget; ``hub.query.health`` reads the per-service counts the projection keeps.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from hub.queries import PICK_WINDOW, SCAN_BUDGET
from hub.stack import NatsServer
from tests.integration.conftest import query, query_all

# Names whose string order differs from a naive "service/instance" order ("a" < "a-b"
# < "a.c" < "b"; "i-10" < "i-2"), over two tenants.
SERVICES = ["a", "a-b", "a.c", "b", "svc-10", "svc-2"]
STATUSES = ["healthy", "degraded", "unhealthy"]


def status_of(k: int) -> str:
    """The health the ``k``-th instance reports: a mix within every service."""
    return STATUSES[(k // len(SERVICES)) % 3]


def fleet(tenant: str, n: int) -> list[dict]:
    """``n`` registrations over SERVICES, versions 1.0/2.0 (every 5th), zones a/b."""
    return [
        {"service_name": SERVICES[k % len(SERVICES)], "instance_id": f"i-{k}",
         "host": "10.0.0.1", "port": 1000 + k, "version": "2.0" if k % 5 == 0 else "1.0",
         "metadata": {"zone": "a" if k % 2 else "b"}, "ttl_s": 3600.0, "tenant": tenant}
        for k in range(n)
    ]  # fmt: skip


async def register(nc, regs: list[dict]) -> int:
    js = nc.jetstream()
    futures = []
    for reg in regs:
        body = {k: v for k, v in reg.items() if k != "tenant"}
        t = reg["tenant"]
        subject = "hub.register" if t == "default" else f"hub.register.{t}"
        futures.append(await js.publish_async(subject, msgspec.json.encode(body)))
    return max(a.seq for a in await asyncio.gather(*futures))


async def beat(nc, regs: list[dict]) -> int:
    """One heartbeat each, reporting ``status_of`` its rank."""
    js = nc.jetstream()
    futures = []
    for k, reg in enumerate(regs):
        body = {"service_name": reg["service_name"], "instance_id": reg["instance_id"],
                "status": status_of(k)}  # fmt: skip
        subject = (
            "hub.heartbeat" if reg["tenant"] == "default" else f"hub.heartbeat.{reg['tenant']}"
        )
        futures.append(await js.publish_async(subject, msgspec.json.encode(body)))
    return max(a.seq for a in await asyncio.gather(*futures))


def order(regs: list[dict]) -> list[tuple[str, str]]:
    return sorted((r["service_name"], r["instance_id"]) for r in regs)


async def walk(nc, subject: str, body: dict) -> list[tuple[str, str]]:
    return [(i["service_name"], i["instance_id"]) for i in await query_all(nc, subject, body)]


async def walk_instances(nc, tenant: str, body: dict) -> list[str]:
    """Every page of hub.query.instances (its cursor: the last instance id)."""
    subject = "hub.query.instances" if tenant == "default" else f"hub.query.instances.{tenant}"
    ids: list[str] = []
    cursor = None
    while True:
        reply = await query(nc, subject, {**body, "cursor": cursor})
        assert reply["success"], reply
        ids += [i["instance_id"] for i in reply["data"]]
        cursor = reply["metadata"]["next_cursor"]
        if cursor is None:
            return ids


async def test_pages_of_any_size_walk_every_instance_once_in_order(start_hub, nc):
    """600 instances in one tenant and 50 in another, over services whose names sort
    differently as strings and as (service, instance) pairs: pages of 1, of 7 and of
    the default size list every instance exactly once, in (service, instance) order,
    tenants apart; with the status and version filters and by service the same holds
    for what matches; hub.query.instances pages by instance id (healthy_only, version,
    metadata); totals and health come from the counts, which agree with the instances."""
    await start_hub(infra_self=False)
    default, acme = fleet("default", 600), fleet("acme", 50)
    await register(nc, default + acme)
    seq = await beat(nc, default + acme)
    first = await query(nc, "hub.query.services", {"min_seq": seq, "limit": 1})
    assert first["metadata"]["total_instances"] == 600, first["metadata"]
    assert first["metadata"]["next_cursor"] == "a/i-0"

    everything = order(default)
    for limit in (1, 7, 1000):
        assert await walk(nc, "hub.query.services", {"limit": limit}) == everything, limit
    assert await walk(nc, "hub.query.services.acme", {"limit": 3}) == order(acme)

    status = {(r["service_name"], r["instance_id"]): status_of(k)
              for k, r in enumerate(default)}  # fmt: skip
    degraded = [p for p in everything if status[p] == "degraded"]
    for limit in (1, 9):
        got = await walk(nc, "hub.query.services", {"status": "degraded", "limit": limit})
        assert got == degraded, limit
    v2 = order([r for r in default if r["version"] == "2.0"])
    assert await walk(nc, "hub.query.services", {"version": "2.0", "limit": 4}) == v2
    a_b = [p for p in everything if p[0] == "a-b"]
    assert await walk(nc, "hub.query.services", {"name": "a-b", "limit": 6}) == a_b
    # A cursor from another service starts the named service at its beginning or end.
    reply = await query(nc, "hub.query.services", {"name": "a-b", "cursor": "a/i-0"})
    assert [(s["service_name"], len(s["instances"])) for s in reply["data"]] == [("a-b", 100)]
    reply = await query(nc, "hub.query.services", {"name": "a-b", "cursor": "b/i-0"})
    assert reply["data"] == [] and reply["metadata"]["next_cursor"] is None

    one = await query(nc, "hub.query.service", {"service_name": "a.c", "limit": 10})
    assert one["metadata"]["total_instances"] == 100
    pages = [one["data"]["instances"]]
    while (cursor := one["metadata"]["next_cursor"]) is not None:
        one = await query(nc, "hub.query.service", {"service_name": "a.c", "cursor": cursor})
        pages.append(one["data"]["instances"])
    assert [i["instance_id"] for p in pages for i in p] == [i for s, i in everything if s == "a.c"]

    b = [i for s, i in everything if s == "b"]
    assert await walk_instances(nc, "default", {"service_name": "b", "limit": 1}) == b
    healthy_b = [i for s, i in everything if s == "b" and status[(s, i)] == "healthy"]
    got = await walk_instances(nc, "default",
                               {"service_name": "b", "healthy_only": True, "limit": 5})  # fmt: skip
    assert got == healthy_b
    zone_b = sorted(r["instance_id"] for r in default
                    if r["service_name"] == "b" and r["metadata"]["zone"] == "b"
                    and r["version"] == "1.0")  # fmt: skip
    got = await walk_instances(
        nc, "default", {"service_name": "b", "metadata": {"zone": "b"}, "version": "1.0",
                        "limit": 3},
    )  # fmt: skip
    assert got == zone_b
    reply = await query(nc, "hub.query.instances", {"service_name": "b", "limit": 2})
    assert reply["metadata"]["total"] == 100

    health = (await query(nc, "hub.query.health", {}))["data"]
    rows = {r["service_name"]: r for r in health["services"]}
    assert sorted(rows) == sorted(SERVICES)
    for svc, row in rows.items():
        mine = [status[p] for p in everything if p[0] == svc]
        assert row["instances"] == len(mine) == 100
        assert row["by_status"] == {s: mine.count(s) for s in set(mine)}
        assert row["status"] == "DEGRADED"  # some healthy, not all
    listed = await query(nc, "hub.query.services", {"name": "b", "limit": 1})
    assert listed["data"][0]["status"] == "degraded"
    one = (await query(nc, "hub.query.health", {"service_name": "svc-2"}))["data"]
    assert [r["service_name"] for r in one["services"]] == ["svc-2"]
    missing = await query(nc, "hub.query.health", {"service_name": "nope"})
    assert missing["error_code"] == "NOT_FOUND"


async def test_pages_are_cut_at_the_reply_byte_budget_not_by_halves(start_hub, nc):
    """300 instances of ~4 KB each (~1.2 MB, beyond the 1 MiB max payload): a page of
    1,000 returns as many as fit (the next one would not), not a half or a quarter;
    every page fits; the walk lists them all."""
    await start_hub(infra_self=False)
    regs = [{**r, "metadata": {"blob": "x" * 3500, "n": k}}
            for k, r in enumerate(fleet("default", 300))]  # fmt: skip
    seq = await register(nc, regs)
    data = msgspec.json.encode({"min_seq": seq, "limit": 1000})
    reply = await nc.request("hub.query.services", data, timeout=10)
    assert len(reply.data) <= nc.max_payload
    page = msgspec.json.decode(reply.data)
    assert page["success"], page["error_code"]
    n = sum(len(s["instances"]) for s in page["data"])
    per_instance = max(len(msgspec.json.encode(i)) for s in page["data"] for i in s["instances"])
    # Cut at the budget (max payload less 4 KiB for the envelope): one more would not fit.
    assert len(reply.data) + per_instance + 100 > nc.max_payload - 4096, (n, len(reply.data))
    assert 200 < n < 300 and page["metadata"]["next_cursor"]
    assert await walk(nc, "hub.query.services", {"limit": 1000}) == order(regs)


@pytest.fixture
def nats_server(request: pytest.FixtureRequest, tmp_path: Path):
    """A fresh NATS, with the max payload its test names (``max_payload`` on the test
    function), else the default (1 MiB)."""
    payload = getattr(request.function, "max_payload", None)
    with NatsServer(tmp_path / "nats", max_payload=payload) as server:
        yield server


async def test_a_page_of_5000_returns_5000_and_filters_spend_a_bounded_scan(start_hub, nc):
    """5,600 instances, NATS' max payload large enough: a page of 5,000 returns 5,000,
    the next the other 600. A filter only the last instance matches: its first page
    comes back empty with a cursor once SCAN_BUDGET instances were examined, and
    following the cursor finds it. Picks examine at most PICK_WINDOW instances and still
    rotate in order (round_robin)."""
    assert SCAN_BUDGET < 5600
    await start_hub(infra_self=False)
    regs = fleet("default", 5600)
    rare = order(regs)[-1]  # the last instance in the order only has this version
    regs = [{**r, "version": "rare"} if (r["service_name"], r["instance_id"]) == rare else r
            for r in regs]  # fmt: skip
    seq = await register(nc, regs)
    first = await query(nc, "hub.query.services", {"min_seq": seq, "limit": 5000}, timeout=30)
    assert first["success"], first["error_code"]
    assert sum(len(s["instances"]) for s in first["data"]) == 5000
    assert first["metadata"]["total_instances"] == 5600
    cursor = first["metadata"]["next_cursor"]
    rest = await query(nc, "hub.query.services", {"limit": 5000, "cursor": cursor}, timeout=30)
    listed = [(s["service_name"], i["instance_id"]) for r in (first, rest)
              for s in r["data"] for i in s["instances"]]  # fmt: skip
    assert listed == order(regs) and rest["metadata"]["next_cursor"] is None

    assert order(regs).index(rare) >= SCAN_BUDGET  # beyond what one page may examine
    short = await query(nc, "hub.query.services", {"version": "rare", "limit": 10}, timeout=30)
    assert short["data"] == [] and short["metadata"]["next_cursor"] is not None
    assert await walk(nc, "hub.query.services", {"version": "rare", "limit": 10}) == [rare]

    svc = regs[0]["service_name"]
    ids = sorted(r["instance_id"] for r in regs if r["service_name"] == svc)
    assert len(ids) > PICK_WINDOW / 2
    turns = []
    for _ in range(3):
        reply = await query(nc, "hub.query.instances", {"service_name": svc, "pick": "round_robin"})
        turns.append(reply["data"][0]["instance_id"])
        assert reply["metadata"]["examined"] <= PICK_WINDOW
    assert turns == ids[:3]
    for how in ("random", "least_load"):
        reply = await query(nc, "hub.query.instances", {"service_name": svc, "pick": how})
        assert reply["success"] and reply["data"][0]["instance_id"] in ids, reply
        assert 1 <= reply["metadata"]["examined"] <= PICK_WINDOW


# A page of 5,000 instances (~2.5 MB) fits.
test_a_page_of_5000_returns_5000_and_filters_spend_a_bounded_scan.max_payload = 8 * 1024 * 1024  # type: ignore[attr-defined]


async def test_an_instance_written_before_docs_is_answered_the_same(start_hub, nc, rds):
    """A page answers an instance from its hash's rendered ``doc`` without parsing it;
    an instance hash written before hashes carried ``doc`` (an older view) is answered
    exactly the same, its doc rendered from its fields at read time."""
    await start_hub()
    regs = fleet("default", 12)
    await register(nc, regs)
    seq = await beat(nc, regs)
    reply = await query(nc, "hub.query.services", {"min_seq": seq})
    assert reply["success"], reply
    before = [i for s in reply["data"] for i in s["instances"]]
    assert len(before) == 12
    keys = [k async for k in rds.scan_iter("hub:default:inst:*")]
    assert len(keys) == 12 and all(await asyncio.gather(*(rds.hexists(k, "doc") for k in keys)))
    for k in keys[::2]:
        await rds.hdel(k, "doc")
    again = await query(nc, "hub.query.services", {})
    assert again["success"], again
    assert [i for s in again["data"] for i in s["instances"]] == before
    picked = await query(nc, "hub.query.instances", {"service_name": "a", "healthy_only": True})
    assert picked["success"] and picked["data"], picked
    assert all(i in before for i in picked["data"]), picked
