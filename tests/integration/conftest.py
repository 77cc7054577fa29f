"""Fixtures that run the hub against the real servers of tests/conftest.py."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import nats.errors
import pytest
import redis.asyncio as aioredis

from events.model import (
    AlertAcknowledged,
    AlertFiring,
    AlertInhibited,
    AlertPending,
    AlertResolved,
    AlertRulesLoaded,
    AlertUninhibited,
    HeartbeatReceived,
    InfraChecked,
    InfraConfigLoaded,
    InfraStatusChanged,
    InputRejected,
    InstanceHealthChanged,
    NotificationDue,
    NotificationFailed,
    NotificationSent,
    ServiceDeregistered,
    ServiceRegistered,
    SilenceCreated,
    SilenceExpired,
)
from hub.app import Hub
from hub.config import HubConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["jetstream", "kafka"])
def event_log_kind(request: pytest.FixtureRequest) -> str:
    """Run the test once per event log adapter."""
    return str(request.param)


@pytest.fixture
def hub_config(
    request: pytest.FixtureRequest, nats_server, redis_server, postgres_server, pg_database
) -> HubConfig:
    """A configuration pointing at this test's fresh servers (JetStream log by default)."""
    kind = (
        request.getfixturevalue("event_log_kind")
        if "event_log_kind" in request.fixturenames
        else "jetstream"
    )
    kafka: dict[str, Any] = {}
    if kind == "kafka":
        server = request.getfixturevalue("kafka_server")
        kafka = {
            "kafka_brokers": (server.bootstrap,),
            "kafka_topic": request.getfixturevalue("kafka_topic"),
        }
    return HubConfig(
        nats_urls=(nats_server.url,),
        postgres_host=postgres_server.host,
        postgres_port=postgres_server.port,
        postgres_db=pg_database,
        postgres_user=postgres_server.user,
        postgres_password=postgres_server.password,
        redis_host=redis_server.host,
        redis_port=redis_server.port,
        event_log=kind,
        log_format="json",
        **kafka,
    )


@pytest.fixture
async def start_hub(hub_config: HubConfig) -> AsyncIterator[Callable[..., Any]]:
    """Start the hub in-process (optionally with config overrides); stopped at teardown."""
    hubs: list[Hub] = []

    async def start(**overrides: Any) -> Hub:
        hub = Hub(dataclasses.replace(hub_config, **overrides))
        await hub.start()
        hubs.append(hub)
        return hub

    yield start
    for hub in hubs:
        await hub.stop()


@pytest.fixture
async def nc(nats_server):
    """A plain nats-py client, as any service would have."""
    client = await nats.connect(nats_server.url)
    yield client
    # close, not drain: a drain can wait on the server well past the test (seen hanging
    # in a full-suite run); nothing here needs in-flight messages delivered.
    await client.close()


@pytest.fixture
async def pg(hub_config: HubConfig):
    conn = await asyncpg.connect(hub_config.postgres_dsn)
    yield conn
    try:
        await asyncio.wait_for(conn.close(), timeout=5)
    except TimeoutError:
        conn.terminate()


@pytest.fixture
async def rds(hub_config: HubConfig):
    client = aioredis.Redis(host=hub_config.redis_host, port=hub_config.redis_port,
                            decode_responses=True)  # fmt: skip
    yield client
    await client.aclose()


async def query(nc, subject: str, body: dict | bytes | None = None, timeout: float = 10.0) -> dict:
    """Request-reply on hub.query.*, decoded.

    "No responders" is retried briefly, as any client should: right after a
    subscription is made, nats-server (2.15) was seen to answer "no responders"
    to a request from another connection for a few milliseconds.
    """
    data = body if isinstance(body, bytes) else msgspec.json.encode(body or {})
    for attempt in range(20):
        try:
            reply = await nc.request(subject, data, timeout=timeout)
            break
        except nats.errors.NoRespondersError:
            if attempt == 19:
                raise
            await asyncio.sleep(0.05)
    return msgspec.json.decode(reply.data)


async def query_all(nc, subject: str, body: dict, timeout: float = 10.0) -> list[dict]:
    """Every page of a paged query; returns the (service, instance) pairs in order."""
    pairs: list[dict] = []
    cursor = None
    while True:
        reply = await query(nc, subject, {**body, "cursor": cursor}, timeout=timeout)
        assert reply["success"], reply
        for svc in reply["data"]:
            pairs.extend({**i, "service_name": svc["service_name"]} for i in svc["instances"])
        cursor = reply["metadata"]["next_cursor"]
        if cursor is None:
            return pairs


async def eventually(
    check: Callable[[], Any],
    *,
    timeout: float = 20.0,
    interval: float = 0.1,
    what: Callable[[], Any] | None = None,
):
    """Poll an async or sync check until it returns a truthy value; return that value.
    ``what``: what to show of the situation when it times out."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            seen = f"; {what()!r}" if what is not None else ""
            raise AssertionError(f"condition not met within {timeout}s: {check}{seen}")
        await asyncio.sleep(interval)


class HubProcess:
    """The hub as a separate OS process (``python -m hub run``), for crash tests."""

    def __init__(
        self, config: HubConfig, log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.config = config
        self.log_path = log_path
        self.env = dict(env or {})  # more environment (e.g. HUB_FAULTS, crash points)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.config.to_env(), "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hub", "run"], cwd=ROOT, env=env, stdout=log, stderr=log
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


# --- processes, read from /proc ------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while read
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def reaped(pid: int) -> bool:
    """Whether ``pid`` is gone altogether: exited and waited for by its parent."""
    return not Path(f"/proc/{pid}").exists()


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def child_running(parent: int, marker: str) -> int | None:
    """The live child of ``parent`` whose command line contains ``marker``."""
    for pid in children(parent):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and alive(pid):
            return pid
    return None


# --- events made by hand, for tests that write the log directly -------------------------

T0 = 1_750_000_000.0


def registered(n: int, *, tenant: str = "default") -> ServiceRegistered:
    """The registration of instance ``i-<n>`` of ``svc-<n % 5>`` (kept by the log)."""
    return ServiceRegistered(
        event_id=f"reg-{tenant}-{n}", tenant=tenant, ts=T0 + n, service_name=f"svc-{n % 5}",
        instance_id=f"i-{n}", host="10.0.0.1", port=8000 + n % 50_000,
    )  # fmt: skip


def heartbeat(n: int, round_: int) -> HeartbeatReceived:
    """Round ``round_`` of instance ``i-<n>``'s heartbeats (each supersedes the one before)."""
    return HeartbeatReceived(
        event_id=f"hb-{n}-{round_}", tenant="default", ts=T0 + 1000 + round_,
        service_name=f"svc-{n % 5}", instance_id=f"i-{n}", load=round_ / 100,
        last_seen=T0 + 1000 + round_,
    )  # fmt: skip


def infra_checked(component: str, round_: int) -> InfraChecked:
    """Round ``round_`` of ``component``'s check results (each supersedes the one before)."""
    return InfraChecked(
        event_id=f"check-{component}-{round_}", tenant="_infra", ts=T0 + 1000 + round_,
        component=component, status="HEALTHY", response_time_ms=1.0 + round_,
    )  # fmt: skip


def deregistered(n: int, *, tenant: str = "default") -> ServiceDeregistered:
    """The deregistration of ``registered(n)``'s instance."""
    return ServiceDeregistered(
        event_id=f"dereg-{tenant}-{n}", tenant=tenant, ts=T0 + 2000 + n,
        service_name=f"svc-{n % 5}", instance_id=f"i-{n}",
    )  # fmt: skip


def health_changed(n: int, status: str, *, previous: str = "healthy") -> InstanceHealthChanged:
    """Instance ``i-<n>``'s health recorded as changed to ``status``."""
    return InstanceHealthChanged(
        event_id=f"health-{n}-{status}", tenant="default", ts=T0 + 1500 + n,
        service_name=f"svc-{n % 5}", instance_id=f"i-{n}", previous=previous, status=status,
        reason=f"reported {status}",
    )  # fmt: skip


def rejected(n: int, *, tenant: str = "default") -> InputRejected:
    """Rejected input number ``n`` (every rejection is kept, by its event id)."""
    return InputRejected(
        event_id=f"rejected-{tenant}-{n}", tenant=tenant, ts=T0 + 500 + n, ingress_seq=n,
        subject="hub.register", reason_code="INVALID_FIELD", reason="port: expected int",
        excerpt='{"port": "x"}',
    )  # fmt: skip


def infra_loaded(*components: str) -> InfraConfigLoaded:
    """An infrastructure configuration monitoring ``components`` (critical, port 1)."""
    return InfraConfigLoaded(
        event_id=f"infra-config-{'-'.join(components)}", tenant="_infra", ts=T0,
        source="infrastructure.yaml", digest=f"digest-{'-'.join(components)}",
        components=[{"name": c, "port": 1, "critical": True} for c in components],
        service_dependencies={"svc-0": list(components)},
    )  # fmt: skip


def infra_status_changed(
    component: str, status: str, *, previous: str = "UNKNOWN"
) -> InfraStatusChanged:
    """``component`` recorded as changed to ``status``."""
    return InfraStatusChanged(
        event_id=f"infra-status-{component}-{status}", tenant="_infra", ts=T0 + 1100,
        component=component, previous=previous, status=status, reason=f"now {status}",
    )  # fmt: skip


def notification_to(
    n: int, receiver: str, *, tenant: str = "acme", severity: str = "critical"
) -> NotificationDue:
    """Notification ``n-<n>`` to ``receiver`` of one alert ``ServiceUnhealthy`` firing on
    ``svc-<n>`` of ``tenant``."""
    labels = {"alertname": "ServiceUnhealthy", "severity": severity, "tenant": tenant,
              "service": f"svc-{n}"}  # fmt: skip
    alert = {"fingerprint": f"fp-{n}", "rule": "ServiceUnhealthy", "severity": severity,
             "labels": labels, "annotations": {"summary": f"svc-{n} is unhealthy"},
             "active_since": T0 + n}  # fmt: skip
    return NotificationDue(
        event_id=f"n-{n}.due", tenant="_hub", ts=T0 + 30 + n, notification_id=f"n-{n}",
        receiver=receiver, group_key=f'{{}}:{{alertname="ServiceUnhealthy",service="svc-{n}"}}',
        group_labels={"alertname": "ServiceUnhealthy", "tenant": tenant}, firing=[alert],
        severity=severity,
    )  # fmt: skip


# Alerts: ``fingerprint`` names the alert; ``n`` orders its events in time (T0 + 3000 + n).
ALERT_T0 = T0 + 3000


def _alert_fields(fingerprint: str, since: float, tenant: str, severity: str,
                  service: str, rule: str) -> dict[str, Any]:  # fmt: skip
    labels = {"alertname": rule, "severity": severity, "tenant": tenant, "service": service}
    return {"tenant": tenant, "fingerprint": fingerprint, "rule": rule, "severity": severity,
            "labels": labels, "annotations": {"summary": f"{service} is down"},
            "active_since": since}  # fmt: skip


def alert_pending(
    fingerprint: str, n: int, *, since: float | None = None, tenant: str = "default",
    severity: str = "critical", service: str = "svc-0", rule: str = "ServiceDown",
) -> AlertPending:  # fmt: skip
    """``fingerprint``'s condition became true at ``since`` (default: now, ALERT_T0 + n)."""
    at = ALERT_T0 + n
    fields = _alert_fields(fingerprint, at if since is None else since, tenant, severity,
                           service, rule)  # fmt: skip
    return AlertPending(event_id=f"pending-{fingerprint}-{n}", ts=at, value=1.0, **fields)


def alert_firing(
    fingerprint: str, n: int, *, since: float | None = None, tenant: str = "default",
    severity: str = "critical", service: str = "svc-0", rule: str = "ServiceDown",
) -> AlertFiring:  # fmt: skip
    """``fingerprint`` fires (active since ``since``, default now: a rule without ``for``)."""
    at = ALERT_T0 + n
    fields = _alert_fields(fingerprint, at if since is None else since, tenant, severity,
                           service, rule)  # fmt: skip
    return AlertFiring(event_id=f"firing-{fingerprint}-{n}", ts=at, value=2.0, **fields)


def alert_resolved(
    fingerprint: str, n: int, *, since: float, tenant: str = "default",
    severity: str = "critical", service: str = "svc-0", rule: str = "ServiceDown",
    fired: bool = True,
) -> AlertResolved:  # fmt: skip
    return AlertResolved(event_id=f"resolved-{fingerprint}-{n}", ts=ALERT_T0 + n, fired=fired,
                         reason="condition cleared", **_alert_fields(
                             fingerprint, since, tenant, severity, service, rule))  # fmt: skip


def alert_inhibited(
    fingerprint: str, n: int, *, by: str, tenant: str = "default"
) -> AlertInhibited:
    return AlertInhibited(event_id=f"inhibited-{fingerprint}-{n}", tenant=tenant,
                          ts=ALERT_T0 + n, fingerprint=fingerprint, by=by,
                          by_rule="dependency", reason=f"{by} is down")  # fmt: skip


def alert_uninhibited(
    fingerprint: str, n: int, *, by: str, tenant: str = "default"
) -> AlertUninhibited:
    return AlertUninhibited(event_id=f"uninhibited-{fingerprint}-{n}", tenant=tenant,
                            ts=ALERT_T0 + n, fingerprint=fingerprint, by=by)  # fmt: skip


def alert_acknowledged(fingerprint: str, n: int, *, author: str = "ops",
                       tenant: str = "default") -> AlertAcknowledged:  # fmt: skip
    return AlertAcknowledged(event_id=f"ack-{fingerprint}-{n}", tenant=tenant, ts=ALERT_T0 + n,
                             fingerprint=fingerprint, author=author, comment="on it")  # fmt: skip


def silence_created(silence_id: str, n: int, *, matchers: list[dict[str, str]],
                    starts_at: float, ends_at: float) -> SilenceCreated:  # fmt: skip
    """A silence of the alerts matching every one of ``matchers`` (tenant ``_hub``)."""
    return SilenceCreated(event_id=f"silence-{silence_id}", tenant="_hub", ts=ALERT_T0 + n,
                          silence_id=silence_id, matchers=matchers, starts_at=starts_at,
                          ends_at=ends_at, created_by="ops", comment="maintenance")  # fmt: skip


def silence_expired(silence_id: str, n: int) -> SilenceExpired:
    return SilenceExpired(event_id=f"silence-expired-{silence_id}", tenant="_hub",
                          ts=ALERT_T0 + n, silence_id=silence_id, reason="expired early",
                          expired_by="ops")  # fmt: skip


def notification_due(notification_id: str, n: int, *, firing: list[str],
                     resolved: tuple[str, ...] = (), severity: str = "critical",
                     tenant: str = "default") -> NotificationDue:  # fmt: skip
    """A notification to ``default/log/0`` of the alerts ``firing`` and ``resolved``."""
    return NotificationDue(
        event_id=f"due-{notification_id}", tenant=tenant, ts=ALERT_T0 + n,
        notification_id=notification_id, receiver="default/log/0",
        group_key=f"ServiceDown/{tenant}",
        group_labels={"alertname": "ServiceDown", "tenant": tenant},
        firing=[{"fingerprint": f} for f in firing],
        resolved=[{"fingerprint": f} for f in resolved], severity=severity,
    )  # fmt: skip


def notification_sent(notification_id: str, n: int, *, attempt: int = 1) -> NotificationSent:
    return NotificationSent(event_id=f"sent-{notification_id}", tenant="_hub", ts=ALERT_T0 + n,
                            notification_id=notification_id, receiver="default/log/0",
                            attempt=attempt, detail="logged")  # fmt: skip


def notification_failed(notification_id: str, n: int, *, attempt: int,
                        next_attempt_at: float) -> NotificationFailed:  # fmt: skip
    """Try ``attempt`` failed; the next at ``next_attempt_at`` (0: given up)."""
    return NotificationFailed(event_id=f"failed-{notification_id}-{attempt}", tenant="_hub",
                              ts=ALERT_T0 + n, notification_id=notification_id,
                              receiver="default/log/0", attempt=attempt, error="timed out",
                              next_attempt_at=next_attempt_at)  # fmt: skip


def alert_rules_loaded(digest: str) -> AlertRulesLoaded:
    return AlertRulesLoaded(event_id=f"alert-rules-{digest}", tenant="_hub", ts=ALERT_T0,
                            source="alerts.yaml", digest=digest)  # fmt: skip
