"""Infrastructure checks against real servers: each method reports a live server HEALTHY,
and a refused, silent or failing one UNHEALTHY with a readable error, on time, without
leaking connections (``filterwarnings = error`` turns an unclosed socket into a failure).

"On time" without a stopwatch (a busy machine makes everything late): a check gives up
at its own timeout, not before (its response time) and not later (it is done before the
same check given a longer timeout, run beside it, gives up)."""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from hub.infra.checkers import CLOSE_TIMEOUT_S, CheckResult, describe_error, run_check
from hub.infra.config import METHODS, Component, HealthCheck, Method, parse_infra_config
from hub.stack import KafkaServer, NatsServer, PostgresServer, RedisServer
from tests.integration.conftest import eventually
from tests.integration.infra_http import HOST, Reply, serve_http, silent_server


def component(method: Method, port: int, *, timeout: float = 3.0, **extra: Any) -> Component:
    """A component on 127.0.0.1:``port``; ``extra`` goes to the health check, except
    ``management_port`` which belongs to the component."""
    management_port = extra.pop("management_port", None)
    return Component(
        name=f"{method}-under-test",
        host=HOST,
        port=port,
        section="databases",
        management_port=management_port,
        health_check=HealthCheck(method=method, timeout=timeout, interval=30.0, **extra),
    )


def closed_port() -> int:
    """A port nothing listens on: bound once to get it, then released."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def assert_healthy(result: CheckResult) -> None:
    assert (result.status, result.error) == ("HEALTHY", ""), result
    assert result.response_time_ms > 0


async def gives_up_on_time(check_with: Callable[[float], Awaitable[CheckResult]],
                           timeout: float) -> CheckResult:  # fmt: skip
    """``check_with(timeout)``, which must time out, run beside ``check_with(longer)``
    where ``longer`` leaves room for closing the client and half a second more: each
    reports its own timeout, neither before it, and the first is done first."""
    longer = timeout + CLOSE_TIMEOUT_S + 0.5
    done: list[float] = []

    async def run(seconds: float) -> CheckResult:
        result = await check_with(seconds)
        done.append(seconds)
        return result

    result, other = await asyncio.gather(run(timeout), run(longer))
    for r, seconds in ((result, timeout), (other, longer)):
        assert (r.status, r.error) == ("UNHEALTHY", f"timed out after {seconds:g} s"), r
        assert r.response_time_ms >= 1000 * seconds, r
    assert done == [timeout, longer], "it did not give up at its own timeout"
    return result


# --- real servers --------------------------------------------------------------------------


async def test_postgres_answers_select_1(postgres_server: PostgresServer) -> None:
    """postgres logs in as the configured user and runs SELECT 1; the metadata carries the
    server's version."""
    check = component("postgres", postgres_server.port, user=postgres_server.user)
    result = await run_check(check, password=postgres_server.password)  # '' = trust
    assert_healthy(result)
    assert result.metadata["server_version"].startswith("16.")


async def test_postgres_failure_is_reported_without_the_password(
    postgres_server: PostgresServer,
) -> None:
    """A database that does not exist is UNHEALTHY with the server's reason; the password
    that was passed appears neither in the error nor in the metadata."""
    check = component(
        "postgres", postgres_server.port, user=postgres_server.user, database="no_such_db"
    )
    # The server's own password (so that the login passes), or any (trust ignores it).
    secret = postgres_server.password or "pw-Secret-42"
    result = await run_check(check, password=secret)
    assert result.status == "UNHEALTHY"
    assert 'database "no_such_db" does not exist' in result.error
    assert secret not in result.error + repr(result.metadata)


async def test_redis_ping(redis_server: RedisServer) -> None:
    """redis_ping gets PONG and the server's version."""
    result = await run_check(component("redis_ping", redis_server.port))
    assert_healthy(result)
    assert result.metadata["server_version"][0].isdigit()


async def test_redis_password_comes_from_the_named_variable(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a password on the server, the check without one fails (NOAUTH), the one whose
    ``password_env`` holds it passes, and a wrong one fails without being echoed."""
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        await client.config_set("requirepass", "rd-Secret-7")
    finally:
        await client.aclose()
    check = component("redis_ping", redis_server.port, password_env="INFRA_TEST_REDIS_PW")
    monkeypatch.delenv("INFRA_TEST_REDIS_PW", raising=False)
    without = await run_check(check)
    assert without.status == "UNHEALTHY" and "Authentication required" in without.error

    monkeypatch.setenv("INFRA_TEST_REDIS_PW", "rd-Secret-7")
    assert_healthy(await run_check(check))

    wrong = await run_check(check, password="rd-Wrong-8")  # the argument wins over the env
    assert wrong.status == "UNHEALTHY" and "rd-Wrong-8" not in wrong.error
    assert "invalid" in wrong.error.lower()


async def test_nats_round_trip(nats_server: NatsServer) -> None:
    """Without a monitoring endpoint, nats connects, flushes (a PING/PONG round trip) and
    closes; the metadata carries the round trip and the server's version."""
    result = await run_check(component("nats", nats_server.port))
    assert_healthy(result)
    assert result.metadata["round_trip_ms"] > 0
    assert result.metadata["server_version"].startswith("2.")


async def test_nats_monitoring_endpoint_from_a_file(nats_server: NatsServer) -> None:
    """A file entry with ``endpoint: /healthz`` and the launcher's monitoring port as
    ``management_port`` GETs the monitoring endpoint instead (status 200, body "ok")."""
    text = f"""
messaging:
  - name: nats-1
    host: {nats_server.host}
    port: {nats_server.port}
    management_port: {nats_server.monitor_port}
    health_check: {{method: nats, endpoint: /healthz, expect_body: ok, timeout: 2}}
"""
    nats = parse_infra_config(text, "nats.yaml", env={}).component("nats-1")
    assert nats.health_url == f"{nats_server.monitor_url}/healthz"
    result = await run_check(nats)
    assert_healthy(result)
    assert result.metadata == {"status_code": 200}


@pytest.mark.kafka
async def test_kafka_admin_describes_the_cluster(kafka_server: KafkaServer) -> None:
    """kafka_admin bootstraps, reads the cluster metadata (one broker here) and closes."""
    result = await run_check(component("kafka_admin", kafka_server.port, timeout=10))
    assert_healthy(result)
    assert result.metadata["broker_count"] == 1
    assert result.metadata["topic_count"] >= 0
    assert result.metadata["cluster_id"]


async def test_tcp_accepts(redis_server: RedisServer) -> None:
    """tcp only needs the port to accept a connection."""
    assert_healthy(await run_check(component("tcp", redis_server.port)))


# --- nothing there, or something that never answers -----------------------------------------


@pytest.mark.parametrize("method", METHODS)
async def test_refused_port_is_unhealthy_at_once(method: Method) -> None:
    """A port with nothing listening is UNHEALTHY with a readable error, found out well
    before the timeout (it is a refusal, not a timeout): a check given only 1.5 s reports
    the refusal, not "timed out"."""
    result = await run_check(component(method, closed_port(), timeout=1.5))
    assert result.status == "UNHEALTHY"
    expected = "cannot connect to Kafka broker" if method == "kafka_admin" else "connection refused"
    assert expected in result.error, result
    gc.collect()  # a leaked socket warns now, inside the test


@pytest.mark.parametrize("method", [m for m in METHODS if m != "tcp"])
async def test_silent_server_times_out_on_time(method: Method) -> None:
    """A server that accepts and never answers makes every protocol check UNHEALTHY
    ("timed out after 0.5 s") at its timeout (see ``gives_up_on_time``), its client
    closed."""
    async with silent_server() as port:
        await gives_up_on_time(lambda t: run_check(component(method, port, timeout=t)), 0.5)
    gc.collect()


# --- HTTP --------------------------------------------------------------------------------------


async def test_http_ok_then_500_then_hanging() -> None:
    """The same endpoint: 200 is HEALTHY, then 500 UNHEALTHY "HTTP 500" (status in the
    metadata), then no answer UNHEALTHY "timed out after 0.4 s", returned on time (see
    ``gives_up_on_time``)."""
    async with serve_http() as server:
        check = component("http", server.port, timeout=0.4, endpoint="/health")

        ok = await run_check(check)
        assert_healthy(ok)
        assert ok.metadata == {"status_code": 200}

        server.reply = Reply(status=500, body=b"boom")
        failed = await run_check(check)
        assert (failed.status, failed.error) == ("UNHEALTHY", "HTTP 500")
        assert failed.metadata == {"status_code": 500}

        server.reply = Reply(hang=True)

        async def hanging(timeout: float) -> CheckResult:  # "/health", or the one beside it
            endpoint = "/health" if timeout == check.health_check.timeout else "/beside"
            return await run_check(component("http", server.port, timeout=timeout,
                                             endpoint=endpoint))  # fmt: skip

        await gives_up_on_time(hanging, check.health_check.timeout)
        assert sorted(server.requests) == ["/beside"] + ["/health"] * 3
    gc.collect()


async def test_http_body_must_contain_the_expected_text() -> None:
    """``expect_body`` passes when the body contains it and fails naming it otherwise."""
    async with serve_http(Reply(body=b'{"status": "ready", "uptime": 12}')) as server:
        ready = await run_check(component("http", server.port, expect_body='"ready"'))
        assert_healthy(ready)
        missing = await run_check(component("http", server.port, expect_body="green"))
        assert (missing.status, missing.error) == ("UNHEALTHY", "body does not contain 'green'")


async def test_http_expected_status_and_redirects() -> None:
    """Without ``expect_status`` any 2xx/3xx is healthy (a redirect is not followed); with
    it, only the listed statuses are."""
    async with serve_http() as server:
        server.routes["/moved"] = Reply(status=302, headers=(("Location", "/elsewhere"),))
        server.routes["/busy"] = Reply(status=503)
        moved = await run_check(component("http", server.port, endpoint="/moved"))
        assert_healthy(moved)
        assert moved.metadata == {"status_code": 302}
        assert server.requests == ["/moved"]

        busy = component("http", server.port, endpoint="/busy", expect_status=(503,))
        assert_healthy(await run_check(busy))
        strict = component("http", server.port, expect_status=(204,))
        assert (await run_check(strict)).error == "HTTP 200"


async def test_http_full_url_endpoint() -> None:
    """An endpoint given as a full URL is fetched as is (not on the component's port)."""
    async with serve_http() as server:
        check = component("http", closed_port(), endpoint=server.url("/v1/.well-known/ready"))
        assert_healthy(await run_check(check))
        assert server.requests == ["/v1/.well-known/ready"]


def test_errors_are_short_and_never_show_the_password() -> None:
    """A driver message that echoes the password is masked before it is shortened, so not
    even the part of the password before the cut survives."""
    exc = RuntimeError("x" * 195 + "pw-Secret-99 and more text")
    error = describe_error(exc, 1.0, secret="pw-Secret-99")
    assert "pw-S" not in error and error.startswith("x" * 195 + "***")
    assert len(describe_error(RuntimeError("y" * 1000), 1.0)) == 200


async def test_checks_run_concurrently() -> None:
    """Checks are independent coroutines: three checks of a server that answers none
    until all three asked all pass (one after the other, the first would time out)."""
    gate = asyncio.Event()
    async with serve_http(Reply(gate=gate)) as server:
        check = component("http", server.port, timeout=10.0)

        async def answer_once_all_asked() -> None:
            await eventually(lambda: len(server.requests) == 3, timeout=20, interval=0.01)
            gate.set()

        *results, _ = await asyncio.gather(*(run_check(check) for _ in range(3)),
                                           answer_once_all_asked())  # fmt: skip
    assert all(r.status == "HEALTHY" for r in results), results
