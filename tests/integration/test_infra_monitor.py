"""The infrastructure monitor inside the hub, against real servers: results become
events, status changes are pushed and kept in PostgreSQL, replay reproduces them."""

from __future__ import annotations

import dataclasses
import signal
import socket
import time
from datetime import datetime

import msgspec
import pytest
import yaml

from events.model import InfraConfigLoaded
from hub.app import Hub
from hub.bootstrap import make_event_log
from hub.infra.config import InfraConfigError
from hub.stack import RedisServer
from tests.integration.conftest import HubProcess, eventually, query
from tests.integration.infra_http import Reply, StubHttpServer
from tests.integration.test_crash import _answers
from tests.integration.test_replay import eventually_equal, replay_reproduces_the_views

# How long to wait for a condition before failing: a guard against hanging, never a
# speed target (how soon the hub acts is checked on the times it records).
PATIENCE = 30.0


def dead_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def component(name: str, port: int, method: str, interval: float, **check) -> dict:
    return {"name": name, "host": "127.0.0.1", "port": port, "type": method,
            "critical": True, "health_check": {"method": method, "interval": interval,
                                               "timeout": min(0.5, interval), **check}}  # fmt: skip


def write_yaml(path, databases=(), messaging=(), search=(), deps=None) -> str:
    path.write_text(yaml.safe_dump({
        "databases": list(databases), "messaging": list(messaging), "search": list(search),
        "service_dependencies": deps or {}, "alerts": {"enabled": True, "channels": ["log"]},
    }))  # fmt: skip
    return str(path)


async def components(nc) -> dict[str, dict]:
    reply = await query(nc, "hub.query.infrastructure", {})
    assert reply["success"], reply
    return {c["name"]: c for c in reply["data"]["components"]}


class Watch:
    def __init__(self) -> None:
        self.changes: list[dict] = []

    async def start(self, nc) -> None:
        async def on(msg) -> None:
            self.changes.append(msgspec.json.decode(msg.data))

        await nc.subscribe("hub.events._infra.infra_status_changed", cb=on)
        await nc.flush()

    def of(self, name: str) -> list[tuple[str, str]]:
        return [(c["previous"], c["status"]) for c in self.changes if c["component"] == name]


async def recorded_config_times(config, nc) -> list[float]:
    """When the hub recorded each configuration load (``InfraConfigLoaded.ts``), from
    the log."""
    log = make_event_log(config, nc, read_only=True)
    await log.start()
    try:
        return [r.event.ts async for records in log.read(None, follow=False)
                for r in records if isinstance(r.event, InfraConfigLoaded)]  # fmt: skip
    finally:
        await log.close()


async def first_results(pg, names) -> dict[str, dict] | None:
    """Per component: its first status change and its first check result (PostgreSQL),
    once every one of ``names`` has a status change there."""
    names = list(names)
    changes = await pg.fetch(
        "SELECT DISTINCT ON (component) component, event_id, previous, status,"
        " consecutive_failures, extract(epoch FROM ts)::float8 AS ts FROM infra_history"
        " WHERE component = ANY($1) ORDER BY component, ts",
        names,
    )
    if len(changes) < len(names):
        return None
    # The log is applied in order: a change is there, so is the result that caused it.
    checks = await pg.fetch(
        "SELECT DISTINCT ON (component) component, event_id, extract(epoch FROM ts)::float8"
        " AS ts FROM infra_checks WHERE component = ANY($1) ORDER BY component, ts",
        names,
    )
    first = {r["component"]: dict(r) for r in checks}
    return {r["component"]: {"change": dict(r), "check": first[r["component"]]} for r in changes}


@pytest.mark.kafka
async def test_real_servers_are_healthy_and_a_dead_port_is_not_within_one_interval(
    start_hub, hub_config, nc, pg, tmp_path, postgres_server, redis_server, nats_server,
    kafka_server, monkeypatch,
):  # fmt: skip
    """A YAML listing the running PostgreSQL, Valkey, NATS (round trip and /healthz) and
    Kafka plus a port with nothing listening: each real one HEALTHY, the dead one
    UNHEALTHY with an error, each set by its first result, within one interval of the
    hub's start; dependents come from service_dependencies."""
    interval = 2.0
    # The server's password, if it has one ('' = trust), named as the file would name it.
    monkeypatch.setenv("TEST_INFRA_PG_PASSWORD", postgres_server.password)
    path = write_yaml(
        tmp_path / "infrastructure.yaml",
        databases=[
            component("postgresql", postgres_server.port, "postgres", interval,
                      user=postgres_server.user, database="postgres",
                      password_env="TEST_INFRA_PG_PASSWORD"),
            component("dragonflydb", redis_server.port, "redis_ping", interval),
            component("ghost-db", dead_port(), "tcp", interval),
        ],
        messaging=[
            component("nats-1", nats_server.port, "nats", interval),
            {**component("nats-monitor", nats_server.port, "nats", interval,
                         endpoint="/healthz"), "management_port": nats_server.monitor_port},
            component("kafka", int(kafka_server.bootstrap.rsplit(":", 1)[1]), "kafka_admin",
                      interval),
        ],
        deps={"data-bridge": {"requires": ["nats-1", "kafka", "dragonflydb"]},
              "api": {"requires": ["postgresql", "dragonflydb"]}},
    )  # fmt: skip
    await start_hub(infra_config=path)
    wanted = {"postgresql": "HEALTHY", "dragonflydb": "HEALTHY", "nats-1": "HEALTHY",
              "nats-monitor": "HEALTHY", "kafka": "HEALTHY", "ghost-db": "UNHEALTHY"}  # fmt: skip

    async def settled() -> dict | None:
        found = await components(nc)
        got = {n: found.get(n, {}).get("status") for n in wanted}
        return found if got == wanted else None

    found = await eventually(settled, timeout=PATIENCE, interval=0.1)
    # Each status was set at once by the component's first result (the dead port's on
    # its first failure, no threshold from UNKNOWN), and that result came within one
    # interval (+ the scheduler's start) of the hub recording its configuration: the
    # times the hub recorded, not this test's clock, which would add the hub's start,
    # the projection and the query.
    firsts = await eventually(lambda: first_results(pg, wanted), timeout=PATIENCE)
    [loaded] = await recorded_config_times(hub_config, nc)
    for name, first in firsts.items():
        change, check = first["change"], first["check"]
        assert (change["previous"], change["status"]) == ("UNKNOWN", wanted[name]), first
        assert change["event_id"] == check["event_id"] + ".status", first
        assert 0 <= check["ts"] - loaded < interval + 1.5, (name, check["ts"] - loaded)
    assert firsts["ghost-db"]["change"]["consecutive_failures"] == 1
    ghost = found["ghost-db"]
    assert ghost["last_check"]["error"] and "refused" in ghost["last_check"]["error"]
    assert all(found[n]["last_check"]["response_time_ms"] > 0 for n in wanted)
    assert found["dragonflydb"]["dependents"] == ["api", "data-bridge"]
    assert found["kafka"]["dependents"] == ["data-bridge"]
    one = await query(nc, "hub.query.infrastructure", {"component": "ghost-db"})
    assert one["data"]["status"] == "UNHEALTHY" and one["data"]["critical"] is True
    assert "ghost-db" in (await query(nc, "hub.query.infrastructure", {}))["data"][
        "critical_unhealthy"]  # fmt: skip
    # Self-monitoring is on by default: the hub's own stack is listed too.
    assert {"hub-postgres", "hub-redis", "hub-nats"} <= set(found)
    missing = await query(nc, "hub.query.infrastructure", {"component": "nope"})
    assert missing["error_code"] == "NOT_FOUND"


async def test_a_stopped_server_trips_after_the_threshold_and_recovers_and_replay_agrees(
    start_hub, hub_config, nc, pg, rds, tmp_path
):
    """The monitored Valkey is stopped mid-run: InfraStatusChanged to UNHEALTHY only after
    two consecutive failures; restarted: HEALTHY again. The transitions are in PostgreSQL
    history, and replay reproduces every view.

    The pushes and the views are separate paths (the views follow the log in a process
    of their own, and may lag what was pushed): each is awaited on its own."""
    interval = 0.5
    restarted: RedisServer | None = None
    watch = Watch()
    await watch.start(nc)  # before the hub: its first result may come at once
    try:
        with RedisServer(tmp_path / "monitored") as monitored:
            path = write_yaml(tmp_path / "infra.yaml", databases=[
                component("cache", monitored.port, "redis_ping", interval)])  # fmt: skip
            hub = await start_hub(infra_config=path, infra_self=False, infra_failures=2)
            await eventually(lambda: watch.of("cache") == [("UNKNOWN", "HEALTHY")],
                             timeout=PATIENCE)  # fmt: skip

            monitored.stop()
            await eventually(lambda: ("HEALTHY", "UNHEALTHY") in watch.of("cache"),
                             timeout=PATIENCE)  # fmt: skip
            [change] = [c for c in watch.changes if c["status"] == "UNHEALTHY"]
            assert change["consecutive_failures"] == 2 and change["reason"].startswith("2 consec")

            async def down() -> dict | None:
                found = (await components(nc)).get("cache")
                return found if found and found["status"] == "UNHEALTHY" else None

            assert (await eventually(down, timeout=PATIENCE))["last_check"]["error"]
            # Not tripped by the first failure (threshold of two): in the journal of
            # results, the one before the result that tripped it failed too, and the one
            # before that passed.
            tripped_by = change["event_id"].removesuffix(".status")
            results = await eventually(lambda: _results_up_to(pg, tripped_by), timeout=PATIENCE)
            assert results[-3:] == ["HEALTHY", "UNHEALTHY", "UNHEALTHY"], results

            restarted = RedisServer(tmp_path / "monitored", port=monitored.port)
            restarted.start()
            await eventually(lambda: watch.of("cache")[-1] == ("UNHEALTHY", "HEALTHY"),
                             timeout=PATIENCE)  # fmt: skip

        async def history() -> list[tuple[str, str]]:
            rows = await pg.fetch("SELECT previous, status FROM infra_history"
                                  " WHERE component = 'cache' ORDER BY ts")  # fmt: skip
            return [tuple(r) for r in rows]

        await eventually_equal(history, [
            ("UNKNOWN", "HEALTHY"),
            ("HEALTHY", "UNHEALTHY"),
            ("UNHEALTHY", "HEALTHY"),
        ])  # fmt: skip
        # Every result before the last change is applied with it: two passed, two failed.
        journal = await pg.fetchval("SELECT count(*) FROM infra_checks WHERE component = 'cache'")
        assert journal >= 4
        await replay_reproduces_the_views(hub, hub_config, pg, rds)
    finally:
        if restarted is not None:
            restarted.stop()


async def _results_up_to(pg, event_id: str) -> list[str] | None:
    """The statuses of the journal's results of "cache" up to the one ``event_id`` (in
    PostgreSQL's journal), once it is there."""
    rows = await pg.fetch("SELECT event_id, status FROM infra_checks WHERE component = 'cache'"
                          " ORDER BY ts")  # fmt: skip
    ids = [r["event_id"] for r in rows]
    return [r["status"] for r in rows[: ids.index(event_id) + 1]] if event_id in ids else None


async def test_an_http_component_healthy_then_500_then_timing_out(start_hub, nc, tmp_path):
    """A local HTTP server answering 200, then 500, then not at all: HEALTHY, UNHEALTHY
    with "HTTP 500", UNHEALTHY timed out (threshold 1 here)."""
    server = await StubHttpServer(reply=Reply(200)).start()
    try:
        path = write_yaml(
            tmp_path / "infra.yaml",
            search=[
                component("weaviate", server.port, "http", 0.4, endpoint="/v1/.well-known/ready")
            ],
        )
        await start_hub(infra_config=path, infra_self=False, infra_failures=1)

        async def status() -> tuple[str, str]:
            c = (await components(nc)).get("weaviate")
            return (c["status"], c["last_check"]["error"]) if c and c["last_check"] else ("", "")

        await eventually(lambda: _is(status, "HEALTHY"), timeout=PATIENCE)
        server.reply = Reply(500, b"boom")
        got = await eventually(lambda: _is(status, "UNHEALTHY"), timeout=PATIENCE)
        assert "HTTP 500" in got[1]
        server.reply = Reply(hang=True)
        got = await eventually(lambda: _timed_out(status), timeout=PATIENCE)
        assert "timed out" in got[1]
        assert server.requests and server.requests[0] == "/v1/.well-known/ready"
    finally:
        await server.close()


async def _is(status, wanted: str):
    got = await status()
    return got if got[0] == wanted else None


async def _timed_out(status):
    got = await status()
    return got if got[0] == "UNHEALTHY" and "timed out" in got[1] else None


async def test_reload_records_the_new_set_and_a_bad_file_keeps_the_old(start_hub, nc, pg, tmp_path):
    """SIGHUP's reload: a changed file is recorded (InfraConfigLoaded) and the views follow
    (a removed component leaves them); a broken file is refused, the old set kept: nothing
    is recorded (the configuration digest in PostgreSQL stays that of the old set)."""
    live = await StubHttpServer().start()
    try:
        path = tmp_path / "infra.yaml"
        write_yaml(path, databases=[component("a", live.port, "tcp", 0.3),
                                    component("b", live.port, "tcp", 0.3)])  # fmt: skip
        hub = await start_hub(infra_config=str(path), infra_self=False)
        started = time.time()
        await eventually(lambda: _names(nc, {"a", "b"}), timeout=PATIENCE)
        first = await eventually(lambda: _recorded_digest(pg, started), timeout=PATIENCE)
        write_yaml(path, databases=[component("a", live.port, "tcp", 0.3),
                                    component("c", live.port, "tcp", 0.3)])  # fmt: skip
        assert await hub.reload_infra()
        reloaded = time.time()
        await eventually(lambda: _names(nc, {"a", "c"}), timeout=PATIENCE)
        await eventually(lambda: _healthy(nc, "c"), timeout=PATIENCE)
        second = await eventually(lambda: _recorded_digest(pg, reloaded), timeout=PATIENCE)
        assert second != first  # the new set was recorded
        path.write_text("databases:\n  - name: a\n    port: 99999\n")
        assert not await hub.reload_infra()
        refused = time.time()
        assert await eventually(lambda: _recorded_digest(pg, refused), timeout=PATIENCE) == second
        await eventually(lambda: _checked_since(nc, refused), timeout=PATIENCE)
        assert set(await components(nc)) == {"a", "c"}
    finally:
        await live.close()


async def _recorded_digest(pg, since: float) -> str | None:
    """The configuration digest in PostgreSQL once it has applied a check result that
    began after ``since``: the log is applied in order, so whatever was recorded before
    that result (a configuration load included) is in it too."""
    newer = await pg.fetchval("SELECT count(*) FROM infra_checks WHERE ts > to_timestamp($1)",
                              since)  # fmt: skip
    return await pg.fetchval("SELECT digest FROM infra_config") if newer else None


async def _checked_since(nc, since: float) -> bool:
    """Whether the Redis view shows, for every component, a result begun after ``since``."""
    found = (await components(nc)).values()
    return bool(found) and all(
        c["last_check"] and _seconds(c["last_check"]["checked_at"]) > since for c in found
    )


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


async def _names(nc, wanted: set[str]) -> bool:
    return set(await components(nc)) == wanted


async def _healthy(nc, name: str) -> bool:
    return (await components(nc))[name]["status"] == "HEALTHY"


async def test_a_bad_infrastructure_file_stops_the_hub_at_start_naming_the_key(
    hub_config, tmp_path
):
    path = tmp_path / "infrastructure.yaml"
    path.write_text("databases:\n  - name: pg\n    host: h\n    port: 5432\n"
                    "    health_check: {method: ping}\n")  # fmt: skip
    hub = Hub(hub_config.__class__(**{**hub_config.__dict__, "infra_config": str(path)}))
    with pytest.raises(InfraConfigError) as failure:
        await hub.start()
    await hub.stop()
    message = str(failure.value)
    assert "infrastructure.yaml" in message and "databases[0].health_check.method" in message


async def test_sighup_makes_a_running_hub_process_reload_its_file(hub_config, nc, tmp_path):
    """`hub run` re-reads infrastructure.yaml on SIGHUP; the new set is in the views."""
    live = await StubHttpServer().start()
    path = tmp_path / "infra.yaml"
    write_yaml(path, databases=[component("before", live.port, "tcp", 0.5)])
    config = dataclasses.replace(hub_config, infra_config=str(path), infra_self=False)
    hub = HubProcess(config, tmp_path / "hub.log")
    hub.start()
    try:
        await eventually(lambda: _answers(nc), timeout=60)
        await eventually(lambda: _names(nc, {"before"}), timeout=PATIENCE)
        write_yaml(path, databases=[component("after", live.port, "tcp", 0.5)])
        assert hub.proc is not None
        hub.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: _names(nc, {"after"}), timeout=PATIENCE)
        await eventually(lambda: _healthy(nc, "after"), timeout=PATIENCE)
        assert hub.proc.poll() is None, hub.tail()  # still running
    finally:
        hub.stop()
        await live.close()
