"""Probing one component: ``run_check`` answers HEALTHY or UNHEALTHY and never raises.

A monitor that crashes or hangs on the component it should report is worse than none,
so every probe runs under the component's own timeout, every failure becomes an
UNHEALTHY result with a short error a person can read ("connection refused",
"timed out after 0.5 s", "HTTP 500"), and every client is closed again within a
bounded time (also when the probe timed out or was cancelled), so nothing leaks.
Passwords are used to connect and appear nowhere else: not in metadata, not in errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import httpx
import msgspec
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError
from nats.aio.client import Client as NatsClient
from nats.errors import NoServersError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from events.vocab import InfraStatus
from hub.infra.config import Component, HealthCheck

CLOSE_TIMEOUT_S = 1.0  # closing a client after a probe never takes longer than this
BODY_LIMIT_BYTES = 64 * 1024  # how much of an HTTP body ``expect_body`` looks at
ERROR_LIMIT_CHARS = 200
CLIENT_NAME = "central-hub-infra-check"

Metadata = dict[str, Any]
# What httpx imports lazily on its first request (see ``preload``).
_LAZY_MODULES = ("httpcore", "h11", "anyio", "anyio._backends._asyncio", "certifi")


class CheckResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one probe; ``response_time_ms`` covers connecting, asking and closing."""

    status: InfraStatus  # HEALTHY or UNHEALTHY, never UNKNOWN
    response_time_ms: float
    error: str = ""
    metadata: Metadata = msgspec.field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return self.status == InfraStatus.HEALTHY


class CheckFailed(Exception):
    """The component answered, but not as a healthy one (the message is the error)."""

    def __init__(self, message: str, metadata: Metadata | None = None) -> None:
        super().__init__(message)
        self.metadata = metadata or {}


async def run_check(
    component: Component,
    *,
    password: str | None = None,
    env: Mapping[str, str] | None = None,
) -> CheckResult:
    """Probe ``component`` once with its configured method; never raises (except cancellation).

    ``password`` (PostgreSQL, Redis) wins over the variable named by
    ``health_check.password_env``, which is looked up in ``env`` (``os.environ`` when None).
    """
    check = component.health_check
    secret = password if password is not None else _password_from_env(check, env)
    started = time.perf_counter()
    try:
        metadata = await _CHECKERS[check.method](component, secret)
    except Exception as exc:
        failure = exc.metadata if isinstance(exc, CheckFailed) else {}
        return CheckResult(
            status=InfraStatus.UNHEALTHY,
            response_time_ms=_elapsed_ms(started),
            error=describe_error(exc, check.timeout, secret=secret),
            metadata=failure,
        )
    return CheckResult(
        status=InfraStatus.HEALTHY, response_time_ms=_elapsed_ms(started), metadata=metadata
    )


async def preload() -> None:
    """Do the slow first-use work of the HTTP client in a worker thread, off the event loop.

    httpx imports its transport (httpcore, h11, anyio's asyncio backend) on the first
    request and a TLS context loads the CA store: ~0.2 s during which the event loop, and
    so every other component's check, would stand still. Call once before checking.
    """
    await asyncio.to_thread(_import_and_build)


def _import_and_build() -> None:
    for module in _LAZY_MODULES:
        with contextlib.suppress(ImportError):  # only an optimisation: a rename costs time
            importlib.import_module(module)
    _tls_context()


def with_passwords(passwords: Mapping[str, str]) -> Callable[[Component], Awaitable[CheckResult]]:
    """A ``run_check`` that passes each component its password from ``passwords`` (by name).

    For callers holding passwords in memory (e.g. the hub's own ``HubConfig``) rather than in
    the environment; the scheduler takes it as its ``check``.
    """

    async def check(component: Component) -> CheckResult:
        return await run_check(component, password=passwords.get(component.name))

    return check


def describe_error(exc: BaseException, timeout: float, *, secret: str | None = None) -> str:
    """A short, readable reason for a failed probe (no tracebacks, no library noise).

    ``secret`` is masked wherever a driver's message might echo it (before shortening, so
    that no part of it survives at the cut).
    """
    for cause in _causes(exc):
        if isinstance(cause, CheckFailed):
            break  # its message is the error
        if isinstance(cause, TimeoutError | httpx.TimeoutException):
            return f"timed out after {timeout:g} s"
        if isinstance(cause, socket.gaierror):
            return "cannot resolve host name"
        if isinstance(cause, OSError) and cause.errno is not None:
            return _errno_text(cause.errno)
        if isinstance(cause, OSError) and "connection refused" in str(cause).lower():
            return "connection refused"  # asyncio's "Multiple exceptions: ..." of all addresses
    text = _redact(str(exc).strip(), secret) or type(exc).__name__
    return text if len(text) <= ERROR_LIMIT_CHARS else text[: ERROR_LIMIT_CHARS - 1] + "…"


# --- one checker per method ---------------------------------------------------------------


async def _check_tcp(component: Component, password: str | None) -> Metadata:
    """The port accepts a connection (for servers without a protocol probe here)."""
    writer: asyncio.StreamWriter | None = None

    async def close() -> None:
        if writer is not None:
            writer.close()
            await writer.wait_closed()

    async with _closing(close), asyncio.timeout(component.health_check.timeout):
        _, writer = await asyncio.open_connection(component.host, component.check_port)
    return {}


async def _check_http(component: Component, password: str | None) -> Metadata:
    """GET the component's health URL: a 2xx/3xx (or the expected status) is healthy."""
    url = component.health_url
    if url is None:  # parse_infra_config gives every http check a URL
        raise CheckFailed("no HTTP endpoint configured")
    return await _http_get(url, component.health_check)


async def _http_get(url: str, check: HealthCheck) -> Metadata:
    # No proxies from the environment: the probe is about the component, not a proxy.
    client = httpx.AsyncClient(
        timeout=check.timeout, trust_env=False, follow_redirects=False, verify=_tls_context()
    )
    request = client.stream("GET", url, headers={"User-Agent": CLIENT_NAME})
    async with _closing(client.aclose), asyncio.timeout(check.timeout), request as response:
        metadata: Metadata = {"status_code": response.status_code}
        if not _status_ok(response.status_code, check.expect_status):
            raise CheckFailed(f"HTTP {response.status_code}", metadata)
        if check.expect_body:
            body = await _read_prefix(response, BODY_LIMIT_BYTES)
            if check.expect_body not in body:
                raise CheckFailed(f"body does not contain {check.expect_body!r}", metadata)
    return metadata


async def _check_redis(component: Component, password: str | None) -> Metadata:
    """PING, and the server's version from ``INFO server``."""
    timeout = component.health_check.timeout
    client = aioredis.Redis(
        host=component.host,
        port=component.check_port,
        password=password or None,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),  # one attempt: the scheduler is the retry
        protocol=2,  # RESP2 (AUTH + PING): every Redis-protocol server speaks it
    )
    async with _closing(client.aclose), asyncio.timeout(timeout):
        await client.ping()
        info = await client.info("server")
    version = (
        info.get("valkey_version") or info.get("dragonfly_version") or info.get("redis_version")
    )
    return {"server_version": str(version)} if version else {}


async def _check_kafka(component: Component, password: str | None) -> Metadata:
    """Cluster metadata from the broker: how many brokers and topics it knows."""
    timeout = component.health_check.timeout
    bootstrap = f"{component.host}:{component.check_port}"
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id=CLIENT_NAME,
        request_timeout_ms=max(1, int(timeout * 1000)),
    )
    async with _closing(admin.close), asyncio.timeout(timeout):
        try:
            await admin.start()
        except KafkaConnectionError:  # its message lists address tuples; say it plainly
            raise CheckFailed(f"cannot connect to Kafka broker {bootstrap}") from None
        cluster = await admin.describe_cluster()
        topics = await admin.list_topics()
    return {
        "broker_count": len(cluster["brokers"]),
        "topic_count": len(topics),
        "cluster_id": cluster.get("cluster_id"),
        "controller_id": cluster.get("controller_id"),
    }


async def _check_postgres(component: Component, password: str | None) -> Metadata:
    """Log in and run ``SELECT 1``."""
    check = component.health_check
    connection: asyncpg.Connection | None = None

    async def close() -> None:
        if connection is not None:
            await connection.close(timeout=CLOSE_TIMEOUT_S)

    user = check.user or "postgres"
    async with _closing(close), asyncio.timeout(check.timeout):
        connection = await asyncpg.connect(
            host=component.host,
            port=component.check_port,
            user=user,
            database=check.database or user,
            password=password or None,
            timeout=check.timeout,
            server_settings={"application_name": CLIENT_NAME},
        )
        await connection.fetchval("SELECT 1")
        version = connection.get_server_version()
    return {"server_version": f"{version.major}.{version.minor}"}


async def _check_nats(component: Component, password: str | None) -> Metadata:
    """GET the monitoring endpoint when one is configured, else a client round trip."""
    url = component.health_url
    if url is not None:
        return await _http_get(url, component.health_check)
    timeout = component.health_check.timeout
    client = NatsClient()

    seen: list[Exception] = []

    async def remember(exc: Exception) -> None:
        """Keep nats-py's errors for the report (by default it would log them)."""
        seen.append(exc)

    async with _closing(client.close), asyncio.timeout(timeout):
        try:
            await client.connect(
                servers=[f"nats://{component.host}:{component.port}"],
                name=CLIENT_NAME,
                connect_timeout=timeout,  # type: ignore[arg-type]  # nats-py annotates int
                allow_reconnect=False,
                # nats-py retries a server forever with 0; 1 = two quick tries, then give up.
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                error_cb=remember,
            )
        except NoServersError:
            if seen:  # the reason, e.g. ConnectionRefusedError, rather than "no servers"
                raise seen[-1] from None
            raise
        started = time.perf_counter()
        await client.flush(timeout=timeout)  # type: ignore[arg-type]
        round_trip_ms = _elapsed_ms(started)
    metadata: Metadata = {"round_trip_ms": round_trip_ms, "max_payload": client.max_payload}
    version = client.connected_server_version
    with contextlib.suppress(ValueError):  # a version that is not semver: leave it out
        metadata["server_version"] = f"{version.major}.{version.minor}.{version.patch}"
    return metadata


_Checker = Callable[[Component, str | None], Awaitable[Metadata]]

# One registry: method name -> checker (parse_infra_config allows exactly these names).
_CHECKERS: dict[str, _Checker] = {
    "tcp": _check_tcp,
    "http": _check_http,
    "redis_ping": _check_redis,
    "kafka_admin": _check_kafka,
    "postgres": _check_postgres,
    "nats": _check_nats,
}


# --- helpers --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _closing(close: Callable[[], Awaitable[object]]) -> AsyncIterator[None]:
    """Run ``close()`` on the way out, bounded and quietly, whatever happened inside.

    Entered *before* the probe's ``asyncio.timeout`` so that closing happens outside of it:
    a probe that used up its time still closes its client (no "unclosed" warnings), and
    a close that hangs cannot hold the caller for more than ``CLOSE_TIMEOUT_S``.
    """
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await close()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for all HTTP probes: building one loads the CA store (slow, blocking)."""
    return ssl.create_default_context()


async def _read_prefix(response: httpx.Response, limit: int) -> str:
    """At most ``limit`` bytes of the body, decoded leniently (for a substring match)."""
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= limit:
            break
    return bytes(data[:limit]).decode("utf-8", errors="replace")


def _status_ok(status: int, expected: tuple[int, ...]) -> bool:
    return status in expected if expected else 200 <= status < 400


def _password_from_env(check: HealthCheck, env: Mapping[str, str] | None) -> str | None:
    if not check.password_env:
        return None
    return (os.environ if env is None else env).get(check.password_env) or None


def _redact(text: str, secret: str | None) -> str:
    """``text`` without ``secret`` (a driver might echo what it was given)."""
    return text.replace(secret, "***") if secret else text


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _errno_text(number: int) -> str:
    if number == errno.ECONNREFUSED:
        return "connection refused"
    if number == errno.ECONNRESET:
        return "connection reset by peer"
    try:
        return os.strerror(number).lower()
    except ValueError:
        return f"system error {number}"
