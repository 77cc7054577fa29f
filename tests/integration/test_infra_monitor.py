"""The infrastructure monitor inside the hub, against real servers: results become
events, status changes are pushed and kept in PostgreSQL, replay reproduces them."""

from __future__ import annotations

import dataclasses
import signal
import socket
import time

import msgspec
import pytest
import yaml

from hub.app import Hub
from hub.infra.config import InfraConfigError
from hub.stack import RedisServer
from tests.integration.conftest import HubProcess, eventually, query
from tests.integration.infra_http import Reply, StubHttpServer
from tests.integration.test_crash import _answers
from tests.integration.test_replay import replay_reproduces_the_views


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


@pytest.mark.kafka
async def test_real_servers_are_healthy_and_a_dead_port_is_not_within_one_interval(
    start_hub, hub_config, nc, tmp_path, postgres_server, redis_server, nats_server,
    kafka_server,
):  # fmt: skip
    """A YAML listing the running PostgreSQL, Valkey, NATS (round trip and /healthz) and
    Kafka plus a port with nothing listening: each real one HEALTHY, the dead one
    UNHEALTHY with an error, each within one interval of the hub's start; dependents
    come from service_dependencies."""
    interval = 2.0
    path = write_yaml(
        tmp_path / "infrastructure.yaml",
        databases=[
            component("postgresql", postgres_server.port, "postgres", interval,
                      user=postgres_server.user, database="postgres"),
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
    started = time.monotonic()
    await start_hub(infra_config=path)
    wanted = {"postgresql": "HEALTHY", "dragonflydb": "HEALTHY", "nats-1": "HEALTHY",
              "nats-monitor": "HEALTHY", "kafka": "HEALTHY", "ghost-db": "UNHEALTHY"}  # fmt: skip

    async def settled() -> dict | None:
        found = await components(nc)
        got = {n: found.get(n, {}).get("status") for n in wanted}
        return found if got == wanted else None

    found = await eventually(settled, timeout=interval + 3, interval=0.1)
    # Within one interval (+ the hub's tick and the projection) of the start.
    assert time.monotonic() - started < interval + 1.5
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
    history, and replay reproduces every view."""
    interval = 0.5
    with RedisServer(tmp_path / "monitored") as monitored:
        path = write_yaml(tmp_path / "infra.yaml", databases=[
            component("cache", monitored.port, "redis_ping", interval)])  # fmt: skip
        hub = await start_hub(infra_config=path, infra_self=False, infra_failures=2)
        watch = Watch()
        await watch.start(nc)
        await eventually(lambda: watch.of("cache") == [("UNKNOWN", "HEALTHY")], timeout=5)

        monitored.stop()
        stopped = time.monotonic()
        await eventually(lambda: ("HEALTHY", "UNHEALTHY") in watch.of("cache"), timeout=10)
        took = time.monotonic() - stopped
        assert took >= interval, "tripped on the first failure"  # threshold of two
        change = watch.changes[-1]
        assert change["consecutive_failures"] == 2 and change["reason"].startswith("2 consec")
        down = (await components(nc))["cache"]
        assert down["status"] == "UNHEALTHY" and down["last_check"]["error"]

        RedisServer(tmp_path / "monitored", port=monitored.port).start()
        await eventually(lambda: watch.of("cache")[-1] == ("UNHEALTHY", "HEALTHY"), timeout=10)
    rows = await pg.fetch("SELECT previous, status FROM infra_history WHERE component = 'cache'"
                          " ORDER BY ts")  # fmt: skip
    assert [tuple(r) for r in rows] == [
        ("UNKNOWN", "HEALTHY"),
        ("HEALTHY", "UNHEALTHY"),
        ("UNHEALTHY", "HEALTHY"),
    ]
    journal = await pg.fetchval("SELECT count(*) FROM infra_checks WHERE component = 'cache'")
    assert journal >= 4
    await replay_reproduces_the_views(hub, hub_config, pg, rds)


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

        await eventually(lambda: _is(status, "HEALTHY"), timeout=5)
        server.reply = Reply(500, b"boom")
        got = await eventually(lambda: _is(status, "UNHEALTHY"), timeout=5)
        assert "HTTP 500" in got[1]
        server.reply = Reply(hang=True)
        got = await eventually(lambda: _timed_out(status), timeout=5)
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
    (a removed component leaves them); a broken file is refused, the old set kept."""
    live = await StubHttpServer().start()
    try:
        path = tmp_path / "infra.yaml"
        write_yaml(path, databases=[component("a", live.port, "tcp", 0.3),
                                    component("b", live.port, "tcp", 0.3)])  # fmt: skip
        hub = await start_hub(infra_config=str(path), infra_self=False)
        await eventually(lambda: _names(nc, {"a", "b"}), timeout=5)
        write_yaml(path, databases=[component("a", live.port, "tcp", 0.3),
                                    component("c", live.port, "tcp", 0.3)])  # fmt: skip
        assert await hub.reload_infra()
        await eventually(lambda: _names(nc, {"a", "c"}), timeout=5)
        await eventually(lambda: _healthy(nc, "c"), timeout=5)
        path.write_text("databases:\n  - name: a\n    port: 99999\n")
        assert not await hub.reload_infra()
        assert set(await components(nc)) == {"a", "c"}
        digests = await pg.fetchval("SELECT count(*) FROM infra_config")
        assert digests == 1
    finally:
        await live.close()


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
        await eventually(lambda: _names(nc, {"before"}), timeout=10)
        write_yaml(path, databases=[component("after", live.port, "tcp", 0.5)])
        assert hub.proc is not None
        hub.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: _names(nc, {"after"}), timeout=10)
        await eventually(lambda: _healthy(nc, "after"), timeout=10)
        assert hub.proc.poll() is None, hub.tail()  # still running
    finally:
        hub.stop()
        await live.close()
