"""SIGKILL the hub mid-ingest: every acknowledged registration survives, none twice."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import msgspec

from events.model import ServiceRegistered
from hub.bootstrap import make_event_log
from tests.integration.conftest import HubProcess, eventually, query, query_all

N = 20_000


async def test_sigkill_mid_ingest_loses_and_duplicates_nothing(
    hub_config, event_log_kind, nc, pg, rds, tmp_path
):
    """Registrations PubAck'd by the stream while the hub process is killed (SIGKILL) are
    all in both views after a restart, with no duplicate rows and no duplicate events."""
    config = dataclasses.replace(hub_config, event_log=event_log_kind)
    hub = HubProcess(config, tmp_path / "hub.log")
    hub.start()
    try:
        # The hub is up once it answers queries.
        await eventually(lambda: _answers(nc), timeout=60)
        js = nc.jetstream()
        futures = [
            await js.publish_async(
                "hub.register",
                msgspec.json.encode(
                    {
                        "service_name": f"svc-{i % 50}",
                        "instance_id": f"i-{i}",
                        "host": "10.1.0.1",
                        "port": 1000 + i % 60000,
                    }
                ),
            )
            for i in range(N)
        ]
        acks = await asyncio.gather(*futures)
        assert len({a.seq for a in acks}) == N  # every registration durably received

        # Kill it while it is still working through them.
        await eventually(lambda: _rows_at_least(pg, 500), timeout=60)
        hub.kill()
        rows_at_kill = await pg.fetchval("SELECT count(*) FROM service_registry")
        assert rows_at_kill < N, "the hub finished before the kill; the test proved nothing"

        hub.start()
        await eventually(lambda: _rows_at_least(pg, N), timeout=180, interval=0.5)
        listed = await query_all(
            nc, "hub.query.services", {"min_seq": max(a.seq for a in acks)}, timeout=30
        )
        assert len(listed) == N
        assert len({i["instance_id"] for i in listed}) == N
    finally:
        hub.stop()

    assert await pg.fetchval("SELECT count(*) FROM service_registry") == N
    assert await pg.fetchval("SELECT count(DISTINCT instance_id) FROM service_registry") == N
    live = sum([await rds.scard(f"hub:default:svc:svc-{k}") for k in range(50)])
    assert live == N
    assert len(await rds.keys("hub:default:inst:*")) == N

    # The log itself holds each registration exactly once.
    log = make_event_log(config, nc, read_only=True)
    await log.start()
    seen: Counter[str] = Counter()
    async for records in log.read(None, follow=False):
        seen.update(r.event.event_id for r in records if isinstance(r.event, ServiceRegistered))
    await log.close()
    assert len(seen) == N
    assert max(seen.values()) == 1


async def _answers(nc) -> bool:
    try:
        return bool((await query(nc, "hub.query.services", {}, timeout=1))["success"])
    except Exception:
        return False


async def _rows_at_least(pg, n: int) -> bool:
    return await pg.fetchval("SELECT count(*) FROM service_registry") >= n
