"""The alert history end to end: alert events recorded in a real log (JetStream, Kafka)
are projected into PostgreSQL by the hub's views process, answered by
``hub.query.alerts`` over NATS from a query server, and rebuilt identically by
``hub replay`` (``hub verify`` agrees before and after, and names a tampered row)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from hub.bootstrap import make_event_log
from projections.alert_view import episode_id
from tests.integration.conftest import (
    ALERT_T0,
    alert_acknowledged,
    alert_firing,
    alert_inhibited,
    alert_pending,
    alert_resolved,
    alert_rules_loaded,
    alert_uninhibited,
    eventually,
    notification_due,
    notification_failed,
    notification_sent,
    query,
    silence_created,
    silence_expired,
)
from tests.integration.test_replay import hub_cli, replay_reproduces_the_views

ALERT_TABLES = ("alerts", "alert_notifications", "alert_silences", "alert_config")


def recorded_alerts(now: float) -> list[Any]:
    """A few alerts of tenant ``default`` (one firing, acknowledged; one inhibited by it
    and silenced; one inhibited by it no more; one resolved; one pending), one of the
    shared infrastructure, one of
    tenant ``acme``; silences active, ended, expired early and not yet started (``now``
    is the wall clock: a silence is active or not when asked); two notifications, one
    sent on its second try, one given up."""
    service = [{"name": "service", "op": "=", "value": "svc-1"}]
    down = [{"name": "alertname", "op": "=", "value": "ServiceDown"}]
    return [
        alert_rules_loaded("digest-1"),
        alert_pending("down", 1), alert_firing("down", 5, since=ALERT_T0 + 1),
        alert_acknowledged("down", 9, author="ana"),
        alert_firing("dep", 6, service="svc-1", severity="warning"),
        alert_inhibited("dep", 7, by="down"),
        alert_firing("up", 8, service="svc-4"), alert_inhibited("up", 9, by="down"),
        alert_uninhibited("up", 10, by="down"),
        alert_firing("old", 2, service="svc-2"), alert_resolved("old", 4, since=ALERT_T0 + 2,
                                                                service="svc-2"),
        alert_pending("pend", 10, service="svc-3", severity="info"),
        alert_firing("kafka", 11, tenant="_infra", service="kafka", rule="HubComponentDown"),
        alert_firing("acme", 12, tenant="acme"),
        silence_created("s-active", 20, matchers=service, starts_at=now - 60, ends_at=now + 3600),
        silence_created("s-ended", 21, matchers=down, starts_at=now - 7200, ends_at=now - 3600),
        silence_created("s-early", 22, matchers=down, starts_at=now - 60, ends_at=now + 3600),
        silence_expired("s-early", 23),
        silence_created("s-later", 24, matchers=down, starts_at=now + 3600, ends_at=now + 7200),
        notification_due("n1", 13, firing=["down"]),
        notification_failed("n1", 14, attempt=1, next_attempt_at=ALERT_T0 + 20),
        notification_sent("n1", 21, attempt=2),
        notification_due("n2", 15, firing=["dep"], severity="warning"),
        notification_failed("n2", 16, attempt=1, next_attempt_at=0.0),
        notification_due("n-acme", 17, firing=["acme"], tenant="acme"),
    ]  # fmt: skip


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


async def alerts(nc, body: dict[str, Any] | None = None, tenant: str = "") -> dict[str, Any]:
    """``hub.query.alerts`` (of ``tenant``: default if not given), the reply decoded."""
    return await query(nc, "hub.query.alerts" + (f".{tenant}" if tenant else ""), body or {})


async def ids(nc, body: dict[str, Any] | None = None, tenant: str = "") -> list[str]:
    """The fingerprints (notification, silence ids) a successful answer lists, in order."""
    reply = await alerts(nc, body, tenant)
    assert reply["success"], reply
    key = {"notifications": "notification_id", "silences": "id"}.get(
        (body or {}).get("include", ""), "fingerprint"
    )
    return [x[key] for x in reply["data"]]


async def _listed(nc, expected: list[str]) -> dict[str, Any] | None:
    """The default answer once it lists ``expected`` (the views process may lag)."""
    reply = await alerts(nc)
    if reply["success"] and [a["fingerprint"] for a in reply["data"]] == expected:
        return reply
    return None


async def test_alert_history_is_projected_answered_over_nats_and_replayed(
    start_hub, event_log_kind, hub_config, nc, pg, rds, monkeypatch, tmp_path
):
    """Alert events recorded in the log before the hub starts: its views process writes
    the alert tables, and ``hub.query.alerts`` answers (active by default, newest
    first; by state, severity, labels, matchers and time; a tenant sees its own and the
    shared alerts; notifications and silences; bad requests refused with the reason).
    Then ``hub verify`` passes and names a tampered alert row; the views wiped, ``hub
    replay`` rebuilds the alert tables row for row and ``hub verify`` agrees."""
    now = time.time()
    log = make_event_log(hub_config, nc if event_log_kind == "jetstream" else None)
    await log.start()
    await log.append(recorded_alerts(now))
    await log.close()
    # Alerting off: the hub decides nothing on this made-up history (its rules are not
    # the hub's, and what they are about is not in the registry), so the views show it
    # as it was recorded.
    (tmp_path / "alerts.yaml").write_text("enabled: false\n")
    monkeypatch.setenv("HUB_ALERTS_FILE", str(tmp_path / "alerts.yaml"))
    hub = await start_hub(infra_self=False)

    # Active ones of tenant default and the shared ones, newest first.
    newest_first = ["kafka", "pend", "up", "dep", "down"]
    active = await eventually(
        lambda: _listed(nc, newest_first),
        timeout=60,
        what=lambda: hub.ingest.state.alerts.config.enabled,
    )
    by_id = {a["fingerprint"]: a for a in active["data"]}
    assert active["metadata"] == {"count": 5, "more": False, "include": "alerts"}
    down = by_id["down"]
    assert {k: down[k] for k in ("id", "rule", "severity", "state", "tenant", "active_since",
                                 "fired_at", "resolved_at", "acknowledged_by", "silenced_by",
                                 "inhibited_by")} == {
        "id": episode_id("down", ALERT_T0 + 1), "rule": "ServiceDown", "severity": "critical",
        "state": "firing", "tenant": "default", "active_since": iso(ALERT_T0 + 1),
        "fired_at": iso(ALERT_T0 + 5), "resolved_at": None, "acknowledged_by": "ana",
        "silenced_by": [], "inhibited_by": None,
    }  # fmt: skip
    assert down["labels"] == {"alertname": "ServiceDown", "severity": "critical",
                              "tenant": "default", "service": "svc-0"}  # fmt: skip
    assert down["annotations"] == {"summary": "svc-0 is down"}
    dep = by_id["dep"]
    assert (dep["inhibited_by"], dep["inhibited_reason"]) == ("down", "down is down")
    assert dep["silenced_by"] == ["s-active"]
    up = by_id["up"]
    assert (up["inhibited_by"], up["inhibited_by_rule"], up["inhibited_reason"]) == (None, "", "")
    assert by_id["pend"]["state"] == "pending" and by_id["pend"]["fired_at"] is None

    # Filters.
    resolved = await alerts(nc, {"state": "resolved"})
    assert [a["fingerprint"] for a in resolved["data"]] == ["old"]
    assert resolved["data"][0]["resolved_at"] == iso(ALERT_T0 + 4)
    assert await ids(nc, {"severity": "warning"}) == ["dep"]
    assert await ids(nc, {"labels": {"service": "svc-3"}}) == ["pend"]
    assert await ids(nc, {"matchers": ['service=~"svc-[01]"']}) == ["dep", "down"]
    assert await ids(nc, {"state": "all", "matchers": [
        {"name": "service", "op": "!=", "value": "svc-0"}, "severity!=info"]}) == [
        "kafka", "up", "dep", "old"]  # fmt: skip
    assert await ids(nc, {"state": "all", "until": iso(ALERT_T0 + 3)}) == ["old", "down"]
    assert await ids(nc, {"state": "all", "since": ALERT_T0 + 4.5, "until": ALERT_T0 + 10}) == [
        "pend", "up", "dep", "down"]  # fmt: skip
    page = await alerts(nc, {"limit": 2})
    assert [a["fingerprint"] for a in page["data"]] == ["kafka", "pend"]
    assert page["metadata"]["more"] is True
    assert await ids(nc, {}, tenant="acme") == ["acme", "kafka"]

    # Notifications and silences.
    notes = await alerts(nc, {"include": "notifications"})
    assert [(n["notification_id"], n["state"], n["attempts"]) for n in notes["data"]] == [
        ("n2", "failed", 1), ("n1", "sent", 2)]  # fmt: skip
    n1 = notes["data"][1]
    assert (n1["firing"], n1["firing_count"], n1["sent_at"]) == (["down"], 1, iso(ALERT_T0 + 21))
    assert await ids(nc, {"include": "notifications", "state": "failed"}) == ["n2"]
    assert await ids(nc, {"include": "silences"}) == ["s-active"]
    every = await alerts(nc, {"include": "silences", "state": "all"})
    assert {s["id"]: s["state"] for s in every["data"]} == {
        "s-active": "active",
        "s-ended": "expired",
        "s-early": "expired",
        "s-later": "pending",
    }
    assert await ids(nc, {"include": "silences", "state": "pending"}) == ["s-later"]

    # Bad requests: the reason, not an empty answer.
    for body, why in (({"state": "burning"}, "state: 'burning' is not a state of alerts"),
                      ({"matchers": ['service=~"("']}, "matchers[0]: invalid regex"),
                      ({"include": "silences", "severity": "critical"}, "severity: silences"),
                      ({"colour": "red"}, "unknown field `colour`")):  # fmt: skip
        reply = await alerts(nc, body)
        assert reply["error_code"] == "INVALID_REQUEST" and why in reply["error_message"], reply

    # Replay and verify: the alert tables too.
    rows = {t: await pg.fetch(f"SELECT * FROM {t} ORDER BY 1") for t in ALERT_TABLES}
    assert [len(rows[t]) for t in ALERT_TABLES] == [7, 3, 4, 1]
    await replay_reproduces_the_views(hub, hub_config, pg, rds)
    assert {t: await pg.fetch(f"SELECT * FROM {t} ORDER BY 1") for t in ALERT_TABLES} == rows
    await pg.execute("UPDATE alerts SET state = 'resolved', resolved_at = now() WHERE id = $1",
                     episode_id("dep", ALERT_T0 + 6))  # fmt: skip
    tampered = hub_cli(hub_config, "verify", "--view", "postgres")
    assert tampered.returncode == 1 and f"alerts/{episode_id('dep', ALERT_T0 + 6)}" in (
        tampered.stdout), tampered.stdout  # fmt: skip
