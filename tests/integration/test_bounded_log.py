"""The event log stays bounded under heartbeat volume, and replay still rebuilds the
same views from what is left (JetStream rolls superseded heartbeats up at once; Kafka
compacts them away in the background)."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from hub.bootstrap import make_event_log
from hub.eventlog.jetstream import STREAM
from tests.integration.conftest import eventually, query
from tests.integration.test_replay import hub_cli_async, replay_reproduces_the_views

INSTANCES = 50


async def register(js) -> int:
    acks = [
        await js.publish_async(
            "hub.register",
            msgspec.json.encode(
                {
                    "service_name": f"svc-{n % 5}",
                    "instance_id": f"i-{n}",
                    "host": "10.2.0.1",
                    "port": 3000 + n,
                    "heartbeat_interval_s": 30,
                }
            ),
        )
        for n in range(INSTANCES)
    ]
    return max(a.seq for a in await asyncio.gather(*acks))


async def heartbeat_round(js, round_: int) -> int:
    acks = [
        await js.publish_async(
            "hub.heartbeat",
            msgspec.json.encode(
                {"service_name": f"svc-{n % 5}", "instance_id": f"i-{n}", "load": round_ + n / 100}
            ),
        )
        for n in range(INSTANCES)
    ]
    return max(a.seq for a in await asyncio.gather(*acks))


async def count_records(config) -> int:
    log = make_event_log(config, None, read_only=True)
    await log.start()
    try:
        return sum([len(batch) async for batch in log.read(None, follow=False, batch=5000)])
    finally:
        await log.close()


async def test_jetstream_log_keeps_one_heartbeat_per_instance(
    start_hub, hub_config, nc, pg, rds, tmp_path, monkeypatch
):
    """2,000 heartbeats of 50 instances leave 50 in the log (plus the registrations);
    the views show the latest load of each; a restarted hub rebuilds from the bounded
    log without re-recording anything; replay reproduces the views. (Self-monitoring
    off: its check results would add a few messages to count.)"""
    # No alert rules: none of the hub's own samples to count either (one record of the
    # rules loaded at start).
    (tmp_path / "alerts.yaml").write_text("rules: []\n")
    monkeypatch.setenv("HUB_ALERTS_FILE", str(tmp_path / "alerts.yaml"))
    hub = await start_hub(infra_self=False)
    js = nc.jetstream()
    await register(js)
    for r in range(40):
        last = await heartbeat_round(js, r)
    reply = await query(nc, "hub.query.services", {"min_seq": last})
    loads = {i["instance_id"]: i["load"] for s in reply["data"] for i in s["instances"]}
    assert loads == {f"i-{n}": 39 + n / 100 for n in range(INSTANCES)}

    info = await js.stream_info(STREAM)
    assert info.state.messages == 2 * INSTANCES + 1, info.state  # 2,051 events recorded
    assert info.state.last_seq >= 41 * INSTANCES

    await hub.stop()
    again = await start_hub(infra_self=False)
    assert again.ingest.state.ingress.floor >= last  # nothing below is re-decided
    assert (await js.stream_info(STREAM)).state.messages == 2 * INSTANCES + 1
    reply = await query(nc, "hub.query.services", {})
    assert {i["instance_id"]: i["load"] for s in reply["data"] for i in s["instances"]} == loads
    await replay_reproduces_the_views(again, hub_config, pg, rds)


@pytest.mark.kafka
@pytest.mark.parametrize("event_log_kind", ["kafka"])
async def test_kafka_log_is_compacted_to_one_heartbeat_per_instance(
    start_hub, event_log_kind, hub_config, nc, pg, rds
):
    """3,000 heartbeats over a few seconds on a topic with 0.5 s segments: the broker's
    cleaner compacts the superseded ones away (most of the log), and replay of the
    compacted log reproduces the views that were built from the whole of it."""
    hub = await start_hub(kafka_segment_ms=500)
    js = nc.jetstream()
    await register(js)
    for r in range(60):
        last = await heartbeat_round(js, r)
        await asyncio.sleep(0.1)
    await query(nc, "hub.query.services", {"min_seq": last})
    await eventually(
        lambda: all(hub.progress.reflects(p.name, last) for p in hub.projections), timeout=30
    )
    appended = hub.metrics.counters["events_appended"]
    assert appended >= 61 * INSTANCES

    async def compacted() -> int | None:
        n = await count_records(hub_config)
        return n if n < appended // 3 else None

    left = await eventually(compacted, timeout=90, interval=2.0)
    print(f"kafka log: {appended} events appended, {left} records left after compaction")
    assert left >= 2 * INSTANCES  # every registration and each instance's last heartbeat
    await replay_reproduces_the_views(hub, hub_config, pg, rds)


async def test_verify_passes_while_heartbeats_roll_up_past_its_checkpoint(
    start_hub, hub_config, nc, pg
):
    """`hub verify` on a live hub: heartbeats keep replacing the ones the views applied
    (the log no longer has them), yet verify passes, comparing those instances without
    their heartbeat fields, and still catches a wrong field on such an instance."""
    await start_hub()
    js = nc.jetstream()
    last = await register(js)
    await query(nc, "hub.query.services", {"min_seq": last})
    stop = asyncio.Event()

    async def beat() -> None:
        r = 0
        while not stop.is_set():
            await heartbeat_round(js, r)
            r += 1
            await asyncio.sleep(0.02)

    beating = asyncio.create_task(beat())
    try:
        await asyncio.sleep(0.5)
        # Every verify passes; verify again until one has run while heartbeats moved past
        # the views' checkpoint (the views keep up closely, so one may find them at the
        # end), which shows it really was live. The deadline only guards against a hang.
        outputs: list[str] = []
        deadline = time.monotonic() + 120
        while not outputs or "heartbeated past the checkpoint" not in outputs[-1]:
            assert time.monotonic() < deadline, outputs
            code, out = await hub_cli_async(hub_config, "verify")
            assert code == 0, out
            outputs.append(out)
        await pg.execute("UPDATE service_registry SET version = 'x' WHERE instance_id = 'i-7'")
        code, out = await hub_cli_async(hub_config, "verify")
        assert code == 1 and "service_registry/default/svc-2/i-7" in out, out
    finally:
        stop.set()
        await beating
