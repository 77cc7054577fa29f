"""Lost views heal themselves, and ``hub verify`` can be trusted on a live hub.

A view emptied behind its projector's back (Redis flushed or restarted without
persistence; PostgreSQL tables truncated; ``hub replay`` swapping in an older view) is
noticed, reported by ``hub verify``, answered ``UNAVAILABLE`` rather than as an empty
registry, and rebuilt from the log with no operator action. ``hub verify`` passes on a
live hub with traffic and fast infrastructure checks, and still reports what is wrong.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import msgspec
import pytest

from hub.replay import Connections, verify
from projections.postgres import WRITTEN_TABLES
from tests.integration.conftest import eventually, query
from tests.integration.test_infra_monitor import component, dead_port, write_yaml
from tests.integration.test_replay import hub_cli_async, live_traffic

# A hang guard, not a speed target: how long a view may take to come back.
PATIENCE = 60.0
VIEWS = {"redis": "redis-registry", "postgres": "postgres-registry"}
# live_traffic's instances that stay registered (every 6th is deregistered; i-0 again).
LIVE = sorted({(f"svc-{i % 3}", f"i-{i}") for i in range(30) if i % 6 or i == 0})


class Traffic:
    """Heartbeats of the live instances every few milliseconds until stopped."""

    def __init__(self, nc) -> None:
        self._js = nc.jetstream()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_seq = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        r = 0
        while not self._stop.is_set():
            futures = []
            for svc, iid in LIVE:
                hb = {"service_name": svc, "instance_id": iid, "load": (r % 10) / 10,
                      "checks": {"round": r}}  # fmt: skip
                futures.append(
                    await self._js.publish_async("hub.heartbeat", msgspec.json.encode(hb))
                )
            self.last_seq = max(a.seq for a in await asyncio.gather(*futures))
            r += 1
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


async def listed(nc) -> list[tuple[str, str]] | str:
    """The registry as hub.query.services pages it, or the error code of a failed page."""
    pairs: list[tuple[str, str]] = []
    cursor = None
    while True:
        reply = await query(nc, "hub.query.services", {"cursor": cursor, "limit": 7})
        if not reply["success"]:
            return str(reply["error_code"])
        pairs += [(s["service_name"], i["instance_id"]) for s in reply["data"]
                  for i in s["instances"]]  # fmt: skip
        cursor = reply["metadata"]["next_cursor"]
        if cursor is None:
            return pairs


async def views_reflect(hub, seq: int) -> None:
    await eventually(lambda: all(hub.progress.reflects(v, seq) for v in VIEWS.values()),
                     timeout=PATIENCE)  # fmt: skip


async def verify_passes(config, view: str) -> str:
    """Run `hub verify --view <view>` until it passes (the view may still be healing);
    its output."""
    out = ""

    async def passes() -> bool:
        nonlocal out
        code, out = await hub_cli_async(config, "verify", "--view", view)
        return code == 0

    try:
        await eventually(passes, timeout=PATIENCE, interval=0.5)
    except AssertionError:
        raise AssertionError(out) from None
    return out


async def wipe(view: str, pg, rds) -> None:
    if view == "redis":
        await rds.flushall()
    else:
        await pg.execute(f"TRUNCATE {', '.join(WRITTEN_TABLES)}, projection_checkpoints")


@pytest.mark.parametrize("view", ["redis", "postgres"])
async def test_a_wiped_view_under_traffic_is_reported_then_heals_itself(
    start_hub, event_log_kind, hub_config, nc, pg, rds, view
):
    """Under heartbeat traffic, a view is wiped (Redis: FLUSHALL; PostgreSQL: every table
    truncated, checkpoints included). The views process is held (SIGSTOP) for a moment
    to look at the wiped view: `hub verify` reports it (no checkpoint over a log that is
    not empty) and, for Redis, queries answer UNAVAILABLE, not an empty registry. Let go,
    the projector notices at its next batch, rebuilds the view from the log with no
    operator action: every page answers either UNAVAILABLE or the full registry
    meanwhile, then the full registry, and `hub verify` passes."""
    hub = await start_hub(infra_self=False)
    seq = await live_traffic(nc)
    await views_reflect(hub, seq)
    assert await listed(nc) == LIVE
    traffic = Traffic(nc)
    traffic.start()
    child = hub.views.pid
    try:
        os.kill(child, signal.SIGSTOP)
        try:
            await wipe(view, pg, rds)
            code, out = await hub_cli_async(hub_config, "verify", "--view", view)
            assert code == 1 and "no checkpoint" in out, out
            if view == "redis":
                reply = await query(nc, "hub.query.services", {})
                assert reply["error_code"] == "UNAVAILABLE", reply
                assert "rebuilds it" in reply["error_message"]
        finally:
            os.kill(child, signal.SIGCONT)

        answers: list[list[tuple[str, str]] | str] = []

        async def healed() -> bool:
            answers.append(await listed(nc))
            return answers[-1] == LIVE

        await eventually(healed, timeout=PATIENCE, interval=0.05)
        assert all(a in ("UNAVAILABLE", LIVE) for a in answers), answers
        name = VIEWS[view]
        await eventually(lambda: hub.metrics.get(f"view_rebuilds:{name}") >= 1, timeout=PATIENCE)
        assert hub.metrics.get(f"view_lost:{name}") >= 1
        await verify_passes(hub_config, view)
    finally:
        await traffic.stop()
    await views_reflect(hub, traffic.last_seq)
    out = await verify_passes(hub_config, "all")
    assert out.count(" OK ") == 2, out
    assert hub.views.pid == child  # healed in place: the process was never restarted


async def test_a_restarted_memory_only_redis_is_noticed_idle_and_rebuilt(
    start_hub, hub_config, nc, rds, redis_server
):
    """The Redis server restarts without persistence (what `hub dev`'s Valkey does) while
    nothing happens: the idle projector notices within its check (the checkpoint is gone;
    the server's run_id changed), rebuilds, and the registry is answered in full again,
    never as an empty registry."""
    hub = await start_hub(infra_self=False)
    seq = await live_traffic(nc)
    await views_reflect(hub, seq)
    lost = {n: hub.metrics.get(f"view_lost:{n}") for n in VIEWS.values()}  # new views count
    before = await rds.info("server")
    os.kill(redis_server.pid, signal.SIGKILL)
    await eventually(lambda: not redis_server.running)
    redis_server.restart()  # (from the main thread: see hub.stack)
    assert (await rds.info("server"))["run_id"] != before["run_id"]
    answers: list[list[tuple[str, str]] | str] = []

    async def healed() -> bool:
        try:
            answers.append(await listed(nc))
        except Exception as exc:  # the query servers' connections come back first
            answers.append(type(exc).__name__)
        return answers[-1] == LIVE

    await eventually(healed, timeout=PATIENCE, interval=0.05)
    assert [] not in answers, answers
    assert hub.metrics.get("view_lost:redis-registry") == lost["redis-registry"] + 1
    assert hub.metrics.get("view_lost:postgres-registry") == lost["postgres-registry"]
    await verify_passes(hub_config, "redis")


async def test_verify_reports_a_view_without_checkpoint_over_a_log_that_is_not_empty(
    start_hub, hub_config, nc, pg, rds
):
    """The hub stopped, both views emptied entirely: `hub verify` reports each (no
    checkpoint although the log holds records), where an empty view used to equal the
    fold of nothing; `hub replay` makes both pass again."""
    hub = await start_hub(infra_self=False)
    seq = await live_traffic(nc)
    await views_reflect(hub, seq)
    await hub.stop()
    await wipe("redis", pg, rds)
    await wipe("postgres", pg, rds)
    code, out = await hub_cli_async(hub_config, "verify")
    assert code == 1, out
    assert out.count("MISMATCH") == 2 and out.count("no checkpoint") == 2, out
    code, out = await hub_cli_async(hub_config, "replay")
    assert code == 0, out
    code, out = await hub_cli_async(hub_config, "verify")
    assert code == 0, out


def fast_checks(path: Path, config) -> str:
    """Infrastructure checked every 0.1 s: NATS, Redis, PostgreSQL (up) and a dead port
    (down, its failure count rising with every check)."""
    nats_port = int(config.nats_urls[0].rsplit(":", 1)[1])
    return write_yaml(
        path,
        databases=[component("fast-pg", config.postgres_port, "tcp", 0.1),
                   component("fast-redis", config.redis_port, "tcp", 0.1)],
        messaging=[component("fast-nats", nats_port, "tcp", 0.1),
                   component("fast-dead", dead_port(), "tcp", 0.1)],
    )  # fmt: skip


async def test_verify_passes_ten_times_in_a_row_on_a_live_hub_and_still_reports_tampering(
    start_hub, event_log_kind, hub_config, nc, pg, rds, tmp_path
):
    """A live hub: heartbeats every few milliseconds and four components checked every
    0.1 s (each check supersedes the previous one in the log). `verify` runs ten times
    in a row (on JetStream, more until one of them has met a component whose check moved
    past the view's checkpoint and out of the log): every run passes (such components
    are compared without their last check, as instances without their heartbeat). Then
    a changed host (Redis and PostgreSQL) and a forged component (both) are reported."""
    config_path = fast_checks(tmp_path / "infra.yaml", hub_config)
    hub = await start_hub(infra_config=config_path, kafka_segment_ms=500)
    seq = await live_traffic(nc)
    await views_reflect(hub, seq)
    traffic = Traffic(nc)
    traffic.start()
    conn = await Connections.open(hub.config)
    try:
        runs, infra_moving = 0, 0
        deadline = time.monotonic() + 180  # a hang guard
        # JetStream drops a superseded check at once; Kafka's cleaner, later (if at all
        # within the test): there a run may well find nothing moving.
        while runs < 10 or (event_log_kind == "jetstream" and not infra_moving):
            assert time.monotonic() < deadline, (runs, infra_moving)
            reports = await verify(conn)
            for r in reports:
                assert r.ok, (runs, r.name, r.problems[:5])
            infra_moving += sum(1 for r in reports for k in r.moving if "infra" in k)
            runs += 1

        await rds.hset("hub:default:inst:svc-1:i-1", "host", "6.6.6.6")
        await pg.execute("UPDATE service_registry SET host = '6.6.6.6' WHERE instance_id = 'i-1'")
        await rds.hset("hub:_infra:component:forged", mapping={"component": "forged"})
        await pg.execute(
            "INSERT INTO infra_status SELECT 'forged', status, status_since, last_result,"
            " checked_at, response_time_ms, error, metadata, consecutive_failures, config"
            " FROM infra_status LIMIT 1"
        )
        reports = {r.name: r for r in await verify(conn)}
        assert not reports["redis"].ok and not reports["postgres"].ok
        redis_problems = "\n".join(reports["redis"].problems)
        pg_problems = "\n".join(reports["postgres"].problems)
        assert "hub:default:inst:svc-1:i-1" in redis_problems and "6.6.6.6" in redis_problems
        assert "hub:_infra:component:forged" in redis_problems
        assert "service_registry/default/svc-1/i-1" in pg_problems and "6.6.6.6" in pg_problems
        assert "infra_status/forged" in pg_problems
    finally:
        await traffic.stop()
        await conn.close()


async def test_replay_on_a_running_hub_is_followed_by_one_rebuild_not_a_loop(
    start_hub, event_log_kind, hub_config, nc, tmp_path
):
    """`hub replay` on a running hub under traffic, with fast infrastructure checks:
    replay swaps in views rebuilt up to where it read the log, usually behind what the
    projectors had applied since. A projector that had gone past it notices at its next
    batch (instead of applying it over the hole, which left rows older than the fold at
    the view's checkpoint) and rebuilds once; one that had not simply goes on. Either
    way the views catch up with later traffic, `verify` passes, and that traffic causes
    no further rebuild (no loop)."""
    config_path = fast_checks(tmp_path / "infra.yaml", hub_config)
    hub = await start_hub(infra_config=config_path, kafka_segment_ms=500)
    seq = await live_traffic(nc)
    await views_reflect(hub, seq)
    traffic = Traffic(nc)
    traffic.start()
    try:
        code, out = await hub_cli_async(hub_config, "replay")
        assert code == 0, out
        mark = traffic.last_seq
        await eventually(lambda: traffic.last_seq > mark + 100, timeout=PATIENCE)
        await views_reflect(hub, traffic.last_seq)  # past the replay: any rebuild is done
        conn = await Connections.open(hub.config)
        try:
            reports = await verify(conn)
            assert all(r.ok for r in reports), [(r.name, r.problems[:5]) for r in reports]
        finally:
            await conn.close()
        rebuilds = {n: hub.metrics.get(f"view_rebuilds:{n}") for n in VIEWS.values()}
        assert all(n <= 2 for n in rebuilds.values()), rebuilds
        mark = traffic.last_seq
        await eventually(lambda: traffic.last_seq > mark + 500, timeout=PATIENCE)
        await views_reflect(hub, traffic.last_seq)
        assert {n: hub.metrics.get(f"view_rebuilds:{n}") for n in VIEWS.values()} == rebuilds
    finally:
        await traffic.stop()
