"""Alerts on real servers: a monitored server stops and starts again, and a webhook
receiver and a subscriber on ``hub.alerts.>`` are each told once; silences, the root cause
of a dependency, a receiver that fails and then says when to come back.

The monitored server is a real Redis-protocol server the test stops and restarts; the
webhook receiver is a real local HTTP server (``webhook_sink``). Times are checked on the
times the hub recorded (event time), never against the wall clock of the test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from typing import Any

import msgspec
import nats
import pytest
import yaml

from events.codec import decode_event, encode_event
from events.model import AlertFiring, AlertInhibited, AlertResolved, NotificationDue
from hub.alerts.rules import AlertConfigError
from hub.app import Hub
from hub.bootstrap import make_event_log
from hub.stack import RedisServer
from tests.integration.conftest import ROOT, HubProcess, eventually, query
from tests.integration.test_crash import _answers
from tests.integration.test_infra_monitor import component, components
from tests.integration.test_outage import _jetstream_capture, _kafka_down, _kafka_up
from tests.integration.test_replay import replay_reproduces_the_views
from tests.integration.webhook_sink import WebhookSink, serve_webhook

PATIENCE = 60.0


def alerts_file(
    path, sink: WebhookSink, *, port: int, deps=None, rules=None, route=None, headers=None
) -> str:
    """An infrastructure file monitoring one server (``cache``) with an alerts section."""
    path.write_text(yaml.safe_dump({
        "databases": [component("cache", port, "redis_ping", 0.2)],
        "service_dependencies": deps or {},
        "alerts": {
            "rules": rules or [{"alert": "CacheDown", "source": "infra_unhealthy",
                                "for": "1s", "severity": "critical",
                                "annotations": {"summary": "{component} is down"}}],
            "route": route or {"receiver": "ops", "group_by": ["alertname", "component"],
                               "group_wait": "1s", "group_interval": "2s",
                               "repeat_interval": "1h"},
            "receivers": [{"name": "ops", "webhook_configs": [{"url": sink.url(),
                                                               "headers": headers or {}}],
                           "nats_configs": [{}]}],
        },
    }))  # fmt: skip
    return str(path)


class Heard:
    """Notifications on ``hub.alerts.<tenant>.<severity>`` and alert events announced on
    ``hub.events.*.alert_*``."""

    def __init__(self) -> None:
        self.notifications: list[tuple[str, dict[str, Any]]] = []
        self.events: list[Any] = []

    async def start(self, nc) -> None:
        async def notified(msg) -> None:
            if len(msg.subject.split(".")) == 4:  # not hub.alerts.silence / .ack
                self.notifications.append((msg.subject, msgspec.json.decode(msg.data)))

        async def announced(msg) -> None:
            self.events.append(decode_event(msg.data))

        await nc.subscribe("hub.alerts.>", cb=notified)
        await nc.subscribe("hub.events.*.*", cb=announced)
        await nc.flush()

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def statuses(self) -> list[str]:
        return [body["status"] for _, body in self.notifications]


def cache_of(hub) -> str:
    """The status the hub has recorded for the monitored server (as it knows it)."""
    found = hub.ingest.state.infra.components.get("cache")
    return found.status if found is not None else ""


def statuses(sink: WebhookSink) -> list[str]:
    return [r.body["status"] for r in sink.requests]


async def all_sent(hub) -> bool:
    """Nothing due and unsent in the hub's outbox (every notification recorded as sent)."""
    return not hub.ingest.state.alerts.outbox


async def test_a_stopped_server_is_notified_once_firing_then_once_resolved(
    tmp_path, start_hub, nc, pg, rds, monkeypatch
):
    heard = Heard()
    await heard.start(nc)
    # A secret in a header is written as a reference: the log keeps the reference.
    monkeypatch.setenv("ALERT_HOOK_TOKEN", "s3cret-token-value")
    async with serve_webhook() as sink:
        with RedisServer(tmp_path / "monitored") as monitored:
            path = alerts_file(tmp_path / "infra.yaml", sink, port=monitored.port,
                               headers={"Authorization": "Bearer ${ALERT_HOOK_TOKEN}"})  # fmt: skip
            hub = await start_hub(infra_config=path, infra_self=False, infra_failures=2)
            await eventually(lambda: cache_of(hub)
                             == "HEALTHY", timeout=PATIENCE)  # fmt: skip
            monitored.stop()
            await eventually(lambda: statuses(sink) == ["firing"] and heard.statuses()
                             == ["firing"], timeout=PATIENCE)  # fmt: skip
        restarted = RedisServer(tmp_path / "monitored", port=monitored.port)
        restarted.start()
        try:
            await eventually(lambda: statuses(sink) == ["firing", "resolved"]
                             and heard.statuses() == ["firing", "resolved"],
                             timeout=PATIENCE)  # fmt: skip
            await eventually(lambda: all_sent(hub), timeout=PATIENCE)
        finally:
            restarted.stop()
    # Exactly once each, to each: the outbox is empty, nothing more is coming.
    assert statuses(sink) == ["firing", "resolved"]
    assert heard.statuses() == ["firing", "resolved"]
    firing = sink.requests[0].body
    assert firing["alerts"][0]["labels"]["component"] == "cache"
    assert firing["alerts"][0]["annotations"]["summary"] == "cache is down"
    subject, body = heard.notifications[0]
    assert subject == "hub.alerts._infra.critical" and body["notificationId"]
    # After `for` and then `group_wait`, on the times the hub recorded.
    [fired] = heard.of(AlertFiring)
    [pending] = [e for e in heard.events if type(e).__name__ == "AlertPending"]
    assert fired.ts - pending.ts >= 1.0
    dues = [e for e in heard.of(NotificationDue) if e.firing]
    assert dues and min(d.ts for d in dues) - fired.ts >= 1.0
    assert sink.requests[0].headers["idempotency-key"] == firing["notificationId"]
    assert len(heard.of(AlertResolved)) == 1
    assert {r.headers["authorization"] for r in sink.requests} == {"Bearer s3cret-token-value"}
    recorded_bytes = [encode_event(e) for e in await recorded_all(hub)]
    assert not [b for b in recorded_bytes if b"s3cret-token-value" in b]
    assert [b for b in recorded_bytes if b"${ALERT_HOOK_TOKEN}" in b]  # (the reference)
    # The alert views: one episode, fired and resolved, and the two notifications sent
    # to each integration; `hub replay` then `hub verify` reproduce them.
    await replay_reproduces_the_views(hub, hub.config, pg, rds)
    episodes = await pg.fetch("SELECT rule, state FROM alerts")
    assert [(r["rule"], r["state"]) for r in episodes] == [("CacheDown", "resolved")]
    notes = await pg.fetch("SELECT state FROM alert_notifications")
    assert sorted(r["state"] for r in notes) == ["sent"] * 4


async def test_a_silence_mutes_firing_not_resolved_and_its_end_notifies_at_once(
    tmp_path, start_hub, nc
):
    heard = Heard()
    await heard.start(nc)
    async with serve_webhook() as sink:
        with RedisServer(tmp_path / "monitored") as monitored:
            route = {"receiver": "ops", "group_by": ["alertname", "component"],
                     "group_wait": "1s", "group_interval": "1s",
                     "repeat_interval": "1h"}  # fmt: skip
            path = alerts_file(tmp_path / "infra.yaml", sink, port=monitored.port, route=route)
            hub = await start_hub(infra_config=path, infra_self=False, infra_failures=2)
            silence = await query(nc, "hub.alerts.silence", {
                "op": "create", "matchers": ['component="cache"'], "duration": "1h",
                "created_by": "ana", "comment": "maintenance"})  # fmt: skip
            assert silence["success"], silence
            await eventually(lambda: cache_of(hub)
                             == "HEALTHY", timeout=PATIENCE)  # fmt: skip
            monitored.stop()
            await eventually(lambda: heard.of(AlertFiring), timeout=PATIENCE)

            async def active() -> list[dict]:
                reply = await query(nc, "hub.query.alerts", {})
                assert reply["success"], reply
                return [a for a in reply["data"] if a["labels"].get("component") == "cache"]

            [alert] = await eventually(active, timeout=PATIENCE)
            assert alert["silenced_by"] == [silence["data"]["silence_id"]]
            assert sink.requests == [] and heard.notifications == []
        restarted = RedisServer(tmp_path / "monitored", port=monitored.port)
        restarted.start()
        try:
            # Resolved while silenced: still delivered (send_resolved_when_silenced).
            await eventually(lambda: statuses(sink) == ["resolved"], timeout=PATIENCE)
            await eventually(lambda: heard.statuses() == ["resolved"], timeout=PATIENCE)
            # Down again under a silence that ends soon: notified when it ends.
            short = await query(nc, "hub.alerts.silence", {
                "op": "create", "matchers": ['alertname="CacheDown"'], "duration": "3s",
                "created_by": "ana"})  # fmt: skip
            assert short["success"], short
            expired = await query(
                nc,
                "hub.alerts.silence",
                {"op": "expire", "id": silence["data"]["silence_id"], "expired_by": "ana"},
            )
            assert expired["success"], expired
            restarted.stop()
            await eventually(lambda: statuses(sink) == ["resolved", "firing"], timeout=PATIENCE)
            ends_at = short["data"]["ends_at"]
            dues = [e for e in heard.of(NotificationDue) if e.firing]
            assert sorted(d.receiver for d in dues) == ["ops/nats/0", "ops/webhook/1"]
            assert all(d.ts >= ends_at for d in dues)  # not before the silence ended
            await eventually(lambda: all_sent(hub), timeout=PATIENCE)
        finally:
            restarted.stop()


async def test_a_service_depending_on_a_stopped_component_gives_one_root_cause_notification(
    tmp_path, start_hub, nc
):
    heard = Heard()
    await heard.start(nc)
    rules = [
        {"alert": "CacheDown", "source": "infra_unhealthy", "for": "0s", "severity": "critical"},
        {"alert": "ServiceUnhealthy", "source": "service_unhealthy", "for": "0s",
         "severity": "critical"},
    ]  # fmt: skip
    route = {"receiver": "ops", "group_by": ["alertname"], "group_wait": "2s",
             "group_interval": "2s", "repeat_interval": "1h"}  # fmt: skip
    async with serve_webhook() as sink:
        with RedisServer(tmp_path / "monitored") as monitored:
            path = alerts_file(tmp_path / "infra.yaml", sink, port=monitored.port, rules=rules,
                               route=route, deps={"orders": {"requires": ["cache"]}})  # fmt: skip
            hub = await start_hub(infra_config=path, infra_self=False, infra_failures=2)
            service = await nats.connect(hub.config.nats_urls[0])
            try:
                await service.publish("hub.register", msgspec.json.encode({
                    "service_name": "orders", "instance_id": "o-1", "host": "127.0.0.1",
                    "port": 8080, "heartbeat_interval_s": 60}))  # fmt: skip
                await eventually(lambda: cache_of(hub)
                                 == "HEALTHY", timeout=PATIENCE)  # fmt: skip
                monitored.stop()
                await eventually(lambda: heard.of(AlertFiring), timeout=PATIENCE)
                # orders cannot reach its cache: it says so.
                await service.publish(
                    "hub.heartbeat",
                    msgspec.json.encode(
                        {"service_name": "orders", "instance_id": "o-1", "status": "unhealthy"}
                    ),
                )
                await eventually(lambda: heard.of(AlertInhibited), timeout=PATIENCE)
                await eventually(lambda: len(sink.requests) == 1, timeout=PATIENCE)
                await eventually(lambda: all_sent(hub), timeout=PATIENCE)
            finally:
                await service.close()
    [inhibited] = heard.of(AlertInhibited)
    assert inhibited.reason == "orders requires component cache"
    fired = {e.rule: e for e in heard.of(AlertFiring)}
    assert set(fired) == {"CacheDown", "ServiceUnhealthy"}
    assert inhibited.fingerprint == fired["ServiceUnhealthy"].fingerprint
    assert inhibited.by == fired["CacheDown"].fingerprint
    [request] = sink.requests
    assert [a["labels"]["alertname"] for a in request.body["alerts"]] == ["CacheDown"]
    assert request.body["rootCause"][0]["impacted"] == ["default/orders"]
    assert len([n for n in heard.notifications if n[1]["status"] == "firing"]) == 1


@pytest.mark.parametrize("script", [[500, 500, (429, {"Retry-After": "2"}), 200]])
async def test_a_failing_webhook_is_retried_as_told_and_does_not_hold_up_the_others(
    tmp_path, start_hub, nc, script
):
    heard = Heard()
    await heard.start(nc)
    async with serve_webhook(script) as sink:
        with RedisServer(tmp_path / "monitored") as monitored:
            path = alerts_file(tmp_path / "infra.yaml", sink, port=monitored.port)
            hub = await start_hub(infra_config=path, infra_self=False, infra_failures=2)
            await eventually(lambda: cache_of(hub)
                             == "HEALTHY", timeout=PATIENCE)  # fmt: skip
            monitored.stop()
            await eventually(lambda: sink.answered == [500, 500, 429, 200], timeout=PATIENCE)
            await eventually(lambda: all_sent(hub), timeout=PATIENCE)
    # The NATS receiver was told before the webhook's first retry was even sent.
    assert heard.statuses() == ["firing"]
    # Retry-After: 2 was honoured (a lower bound; the receiver's own clock).
    assert sink.requests[3].at - sink.requests[2].at >= 2.0
    assert len({r.headers["idempotency-key"] for r in sink.requests}) == 1
    failed = await recorded(hub, "NotificationFailed")
    assert [f.attempt for f in failed] == [1, 2, 3]
    assert failed[2].next_attempt_at - failed[2].ts >= 2.0
    sent = await recorded(hub, "NotificationSent")
    webhook = [s for s in sent if "/webhook/" in s.receiver]
    assert [s.attempt for s in webhook] == [4]
    # The NATS integration's Sent was recorded before the webhook's first failure.
    nats_sent = [s for s in sent if "/nats/" in s.receiver]
    assert nats_sent and nats_sent[0].ts <= failed[1].ts


async def recorded(hub, type_name: str) -> list[Any]:
    """The events of a type in the hub's log, in order."""
    out = []
    async for records in hub.event_log.read(None, follow=False):
        out += [r.event for r in records if type(r.event).__name__ == type_name]
    await asyncio.sleep(0)
    return out


@pytest.mark.parametrize("crash", ["notification_due_recorded", "notification_sent_unrecorded"])
async def test_a_hub_killed_around_a_notification_sends_it_once_or_twice_with_one_key(
    tmp_path, hub_config, nc, crash
):
    """SIGKILL right after ``NotificationDue`` is recorded (nothing sent yet): after the
    restart the webhook gets it exactly once. SIGKILL right after the webhook answered
    200, before ``NotificationSent`` is recorded: the restarted hub cannot know it was
    taken, so the webhook gets it twice, with the same idempotency key both times."""
    async with serve_webhook() as sink:
        with RedisServer(tmp_path / "monitored") as monitored:
            path = tmp_path / "infra.yaml"
            alerts_file(path, sink, port=monitored.port)
            data = yaml.safe_load(path.read_text())
            data["alerts"]["receivers"] = [{"name": "ops",
                                            "webhook_configs": [{"url": sink.url()}]}]  # fmt: skip
            path.write_text(yaml.safe_dump(data))
            config = dataclasses.replace(hub_config, infra_config=str(path), infra_self=False,
                                         infra_failures=2)  # fmt: skip
            hub = HubProcess(config, tmp_path / "hub.log", env={"HUB_FAULTS": crash})
            hub.start()
            try:
                await eventually(lambda: _answers(nc), timeout=PATIENCE)
                await eventually(lambda: cache_healthy(nc), timeout=PATIENCE)
                monitored.stop()
                # The crash point kills it (not the test).
                await eventually(lambda: hub.proc.poll() is not None, timeout=PATIENCE)
                assert hub.proc.returncode == -signal.SIGKILL, hub.tail()
                seen_before = len(sink.requests)
                assert seen_before == (1 if crash == "notification_sent_unrecorded" else 0)
                hub.env = {}
                hub.start()
                await eventually(lambda: len(sink.requests) >= seen_before + 1, timeout=PATIENCE)
                await eventually(lambda: outbox_empty(config, nc), timeout=PATIENCE)
            finally:
                hub.stop()
    keys = [r.headers["idempotency-key"] for r in sink.requests]
    if crash == "notification_due_recorded":
        assert len(keys) == 1  # exactly once
    else:
        assert len(keys) == 2 and keys[0] == keys[1]  # at least once, one key
    assert all(r.body["status"] == "firing" for r in sink.requests)


async def _log_events(config, nc) -> list[Any]:
    log = make_event_log(config, nc, read_only=True)
    await log.start()
    try:
        return [r.event async for records in log.read(None, follow=False) for r in records]
    finally:
        await log.close()


async def cache_healthy(nc) -> bool:
    found = (await components(nc)).get("cache")
    return bool(found and found["status"] == "HEALTHY")


async def outbox_empty(config, nc) -> bool:
    """Every notification due in the log has its NotificationSent (or was given up)."""
    due, done = set(), set()
    for e in await _log_events(config, nc):
        if isinstance(e, NotificationDue):
            due.add(e.notification_id)
        elif type(e).__name__ == "NotificationSent" or (
            type(e).__name__ == "NotificationFailed" and not e.next_attempt_at
        ):
            done.add(e.notification_id)
    return bool(due) and due <= done


@pytest.mark.parametrize("fault", ["kafka-kill", "jetstream-unwritable"])
async def test_the_event_log_down_is_heard_out_of_band_and_recorded_once_it_is_back(
    request, tmp_path, start_hub, nc, fault
):
    """The event log cannot be written (the Kafka broker SIGKILLed; the JetStream log's
    stream no longer capturing): the alert cannot be recorded first, yet a subscriber on
    ``hub.alerts.>`` hears it while the log is still down, after the rule's ``for`` and
    ``group_wait``. Once the log is back the alert is recorded once (fired late), the
    notification said out of band is recorded as sent (not said again), and the webhook,
    which is not told out of band, hears of it once, resolved, from the outbox."""
    kind = "jetstream" if fault.startswith("jetstream") else "kafka"
    kafka = request.getfixturevalue("kafka_server") if kind == "kafka" else None
    heard = Heard()
    await heard.start(nc)
    rules = [
        {
            "alert": "EventLogDown",
            "source": "event_log_down",
            "for": "1s",
            "severity": "critical",
            "annotations": {"summary": "the {log} log is down"},
        }
    ]
    async with serve_webhook() as sink:
        with RedisServer(tmp_path / "monitored") as monitored:
            path = alerts_file(tmp_path / "infra.yaml", sink, port=monitored.port, rules=rules)
            hub = await start_hub(
                infra_config=path, infra_self=False, infra_failures=2, log_stall_s=0.5,
                event_log=kind, **({"kafka_brokers": (kafka.bootstrap,),
                                    "kafka_topic": request.getfixturevalue("kafka_topic")}
                                   if kafka else {}),
            )  # fmt: skip
            await eventually(lambda: cache_of(hub)
                             == "HEALTHY", timeout=PATIENCE)  # fmt: skip
            if kafka is not None:
                _kafka_down(kafka, "kill")
            else:
                await _jetstream_capture(nc, on=False)
            try:
                await eventually(lambda: heard.statuses() == ["firing"], timeout=PATIENCE)
                stalled_since = hub.status.log_stalled_since
                assert stalled_since is not None  # heard while the log is still down
                heard_at = hub.clock()
                assert heard_at - stalled_since >= 1.0 + 1.0  # for + group_wait
                subject, body = heard.notifications[0]
                assert subject == "hub.alerts._hub.critical"
                assert body["recorded"] is False  # said before it could be recorded
                assert body["alerts"][0]["annotations"]["summary"] == f"the {kind} log is down"
                assert sink.requests == []  # the webhook is not told out of band
            finally:
                if kafka is not None:
                    await _kafka_up(kafka, "kill")
                else:
                    await _jetstream_capture(nc, on=True)
            # The webhook was not told out of band; the outage is over when the log is back,
            # so it hears it once, as resolved, with its start and end.
            await eventually(
                lambda: statuses(sink) == ["resolved"],
                timeout=120,
                what=lambda: (statuses(sink), heard.statuses(), hub.status.log_stalled_since),
            )
            await eventually(lambda: all_sent(hub), timeout=PATIENCE)
    events = await recorded_all(hub)
    fired = [e for e in events if isinstance(e, AlertFiring) and e.rule == "EventLogDown"]
    assert len(fired) == 1 and fired[0].recorded_late
    assert fired[0].active_since == stalled_since
    resolved = [e for e in events if isinstance(e, AlertResolved) and e.rule == "EventLogDown"]
    assert len(resolved) == 1
    sent = [e for e in events if type(e).__name__ == "NotificationSent" and e.out_of_band]
    assert [s.receiver for s in sent] == ["ops/nats/0"]
    # Heard once firing (out of band, not again from the outbox), then resolved.
    assert heard.statuses() == ["firing", "resolved"]
    [told] = sink.requests[0].body["alerts"]
    assert told["status"] == "resolved" and told["labels"]["log"] == kind


async def recorded_all(hub) -> list[Any]:
    out = []
    async for records in hub.event_log.read(None, follow=False):
        out += [r.event for r in records]
    return out


async def test_alerts_simulate_lists_what_a_lower_threshold_would_have_fired(
    tmp_path, start_hub, hub_config, nc, monkeypatch
):
    """Recorded with a dead-letter rule at 10 a minute, five bad messages fire nothing;
    ``hub alerts simulate`` with the threshold at 2, run as a person would (the command,
    its output read), lists the extra alert, and writes nothing to the log."""
    recorded = tmp_path / "alerts.yaml"
    rule = {"alert": "DeadLetters", "source": "dead_letters_per_min", "threshold": 10,
            "for": "0s", "severity": "warning"}  # fmt: skip
    recorded.write_text(yaml.safe_dump({"rules": [rule]}))
    lower = tmp_path / "lower.yaml"
    lower.write_text(yaml.safe_dump({"rules": [{**rule, "threshold": 2}]}))
    monkeypatch.setenv("HUB_ALERTS_FILE", str(recorded))
    hub = await start_hub(infra_self=False)
    for i in range(5):
        await nc.publish("hub.register", b"{not json " + str(i).encode())
    await eventually(lambda: hub.ingest.state.alerts.gauges.get("dead_letters_per_min", 0) >= 5,
                     timeout=PATIENCE)  # fmt: skip
    assert not [e for e in await recorded_all(hub) if isinstance(e, AlertFiring)]
    before = len(await recorded_all(hub))
    env = {**os.environ, **hub_config.to_env()}
    env.pop("HUB_ALERTS_FILE")
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "hub", "alerts", "simulate", "--rules", str(lower)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "1 alert(s) would have fired (0 did)" in out, out
    extra = out.split("extra: would have fired, did not (1):\n")[1].splitlines()[0]
    assert extra.split()[:2] == ["DeadLetters", "warning"], out
    same = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "hub", "alerts", "simulate", "--rules",
                         str(recorded), "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert json.loads(same.stdout)["extra"] == []
    # A bad rules file: the error names the file, the rule and the key.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rules": [{**rule, "threshold": "lots"}]}))
    refused = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "hub", "alerts", "simulate", "--rules", str(bad)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2
    assert str(bad) in refused.stderr and "DeadLetters" in refused.stderr
    assert "threshold" in refused.stderr, refused.stderr
    # Nothing was written (the hub's own sampling aside: compare alert decisions only).
    after = await recorded_all(hub)
    assert not [e for e in after[before:] if isinstance(e, AlertFiring)]


async def test_rules_are_checked_at_start_and_on_reload_which_keeps_them_when_bad(
    tmp_path, start_hub, hub_config, monkeypatch
):
    """A bad rules file stops the start with the file, the rule and the key named; on a
    reload (what SIGHUP does) a bad file is refused and the rules in force stay, and a
    good one is recorded."""
    rules = tmp_path / "alerts.yaml"
    monkeypatch.setenv("HUB_ALERTS_FILE", str(rules))
    rules.write_text(yaml.safe_dump({"rules": [{"alert": "Lag", "source": "projection_lag_s",
                                                "for": "1m"}]}))  # fmt: skip
    with pytest.raises(AlertConfigError) as refused:
        await Hub(dataclasses.replace(hub_config, infra_self=False)).start()
    message = str(refused.value)
    assert message.startswith(f'{rules}: rules[0] (alert "Lag"): threshold'), message
    good = {"rules": [{"alert": "Lag", "source": "projection_lag_s", "threshold": 30}]}
    rules.write_text(yaml.safe_dump(good))
    hub = await start_hub(infra_self=False)
    await eventually(lambda: hub.ingest.state.alerts.source == str(rules), timeout=PATIENCE)
    before = hub.ingest.state.alerts.digest
    rules.write_text(yaml.safe_dump({"rules": [{**good["rules"][0], "severity": "loud"}]}))
    await hub.reload_infra()  # what SIGHUP does
    assert await hub.alerting.reload() is False  # (the alerts' own answer)
    assert hub.ingest.state.alerts.digest == before  # kept
    rules.write_text(yaml.safe_dump({"rules": [{**good["rules"][0], "threshold": 5}]}))
    await hub.reload_infra()
    await eventually(lambda: hub.ingest.state.alerts.digest != before, timeout=PATIENCE)
    assert hub.ingest.state.alerts.config.rules[0].threshold == 5
