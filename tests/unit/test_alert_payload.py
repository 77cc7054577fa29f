"""The body of a notification (an Alertmanager webhook payload, version 4, plus our
fields) and the NATS subject it is published on, as pure functions of the
``NotificationDue``."""

from __future__ import annotations

from typing import Any

from events.model import NotificationDue
from hub.alerts.payload import ZERO_TIME, alertnames, render, rfc3339, subject_for

T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z


def entry(
    rule: str, *, tenant: str | None = "acme", severity: str = "warning", **extra: Any
) -> dict[str, Any]:
    labels = {"alertname": rule, "severity": severity, "service": "orders"}
    if tenant is not None:
        labels["tenant"] = tenant
    return {
        "fingerprint": f"fp-{rule}-{tenant}", "rule": rule, "severity": severity,
        "labels": labels, "annotations": {"summary": f"{rule} on orders"},
        "active_since": T0, **extra,
    }  # fmt: skip


def due(
    firing: list[dict[str, Any]] | None = None,
    resolved: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> NotificationDue:
    values: dict[str, Any] = {
        "event_id": "n1.due", "tenant": "_hub", "ts": T0 + 60, "notification_id": "n1",
        "receiver": "pager/webhook/0", "group_key": '{}:{alertname="ServiceUnhealthy"}',
        "group_labels": {"alertname": "ServiceUnhealthy", "tenant": "acme"},
        "firing": firing or [], "resolved": resolved or [], "epoch": 2, "severity": "critical",
    }  # fmt: skip
    return NotificationDue(**{**values, **fields})


def test_a_firing_group_renders_as_alertmanager_webhook_version_4():
    """Every field Alertmanager's webhook sends, with its meaning, plus our own."""
    body = render(due([entry("ServiceUnhealthy", severity="critical")]), receiver_name="pager")
    labels = {"alertname": "ServiceUnhealthy", "severity": "critical", "service": "orders",
              "tenant": "acme"}  # fmt: skip
    assert body == {
        "version": "4",
        "groupKey": '{}:{alertname="ServiceUnhealthy"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "pager",
        "groupLabels": {"alertname": "ServiceUnhealthy", "tenant": "acme"},
        "commonLabels": labels,
        "commonAnnotations": {"summary": "ServiceUnhealthy on orders"},
        "externalURL": "",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {"summary": "ServiceUnhealthy on orders"},
                "startsAt": "2025-06-15T15:06:40Z",
                "endsAt": ZERO_TIME,
                "fingerprint": "fp-ServiceUnhealthy-acme",
            }
        ],
        "notificationId": "n1",
        "epoch": 2,
    }


def test_status_is_resolved_only_when_nothing_fires_and_resolved_alerts_carry_their_end():
    """``status`` is "firing" while any alert fires; a resolved alert ends at its
    ``resolved_at``, a firing one at Go's zero time."""
    gone = entry("InstanceExpired", resolved_at=T0 + 90.5)
    mixed = render(due([entry("ServiceUnhealthy")], [gone]), receiver_name="r")
    assert mixed["status"] == "firing"
    assert [(a["status"], a["endsAt"]) for a in mixed["alerts"]] == [
        ("firing", ZERO_TIME),
        ("resolved", "2025-06-15T15:08:10.500Z"),
    ]
    only_resolved = render(due([], [gone]), receiver_name="r")
    assert only_resolved["status"] == "resolved"


def test_common_labels_and_annotations_are_the_pairs_all_alerts_share():
    """As Alertmanager: a label in every alert with the same value is common; one that
    differs or is missing somewhere is not."""
    a = entry("ServiceUnhealthy")
    b = entry("ServiceDegraded")
    b["labels"] = {**b["labels"], "zone": "eu"}
    b["annotations"] = {"summary": "other", "runbook": "x"}
    body = render(due([a, b]), receiver_name="r")
    assert body["commonLabels"] == {"severity": "warning", "service": "orders", "tenant": "acme"}
    assert body["commonAnnotations"] == {}


def test_alertname_comes_from_the_rule_when_the_labels_lack_it():
    """Receivers written for Alertmanager count on ``alertname`` in every alert."""
    bare = {"fingerprint": "f", "rule": "EventLogDown", "severity": "critical", "labels": {},
            "annotations": {}, "active_since": T0}  # fmt: skip
    body = render(due([bare]), receiver_name="r")
    assert body["alerts"][0]["labels"] == {"alertname": "EventLogDown", "severity": "critical"}
    assert alertnames(due([bare, entry("EventLogDown"), entry("Other")])) == [
        "EventLogDown",
        "Other",
    ]


def test_root_cause_lists_the_alerts_that_impact_others_and_only_then():
    """An alert with ``impacted`` dependents appears in ``rootCause``; without any such
    alert the key is absent."""
    cause = entry("HubComponentDown", tenant="_infra", impacted=["acme/orders", "acme/pay"])
    body = render(due([cause, entry("ServiceUnhealthy")]), receiver_name="r")
    assert body["rootCause"] == [
        {
            "fingerprint": "fp-HubComponentDown-_infra",
            "alertname": "HubComponentDown",
            "impacted": ["acme/orders", "acme/pay"],
        }
    ]
    assert "rootCause" not in render(due([entry("ServiceUnhealthy")]), receiver_name="r")


def test_subject_uses_the_group_tenant_and_the_notification_severity():
    """``hub.alerts.<tenant>.<severity>`` with the tenant of the group labels."""
    assert subject_for(due([entry("X", tenant="other")])) == "hub.alerts.acme.critical"


def test_subject_falls_back_to_the_tenant_all_alerts_share_then_to_hub():
    """Without a tenant among the group labels: the one tenant of all alerts, else
    ``_hub`` (alerts of several tenants, or of none)."""
    group = {"alertname": "X"}
    one = due([entry("X", tenant="acme"), entry("Y", tenant="acme")], group_labels=group)
    assert subject_for(one) == "hub.alerts.acme.critical"
    two = due([entry("X", tenant="acme"), entry("Y", tenant="beta")], group_labels=group)
    assert subject_for(two) == "hub.alerts._hub.critical"
    none = due([entry("X", tenant=None)], group_labels=group)
    assert subject_for(none) == "hub.alerts._hub.critical"
    infra = due([entry("X", tenant="_infra")], group_labels=group)
    assert subject_for(infra) == "hub.alerts._infra.critical"


def test_subject_never_carries_a_token_that_is_not_a_tenant_name():
    """A tenant label with a dot or a space would change the subject's shape: ``_hub``."""
    for bad in ("a.b", "a b", "", ">"):
        assert subject_for(due([entry("X")], group_labels={"tenant": bad})).startswith(
            "hub.alerts._hub."
        )


def test_subject_severity_falls_back_to_the_most_severe_alert():
    """A notification without a known severity takes the most severe of its alerts."""
    alerts = [entry("X", severity="info"), entry("Y", severity="warning")]
    assert subject_for(due(alerts, severity="")) == "hub.alerts.acme.warning"
    assert subject_for(due([entry("X", severity="?")], severity="")) == "hub.alerts.acme.info"


def test_times_are_rfc3339_in_utc():
    """Whole seconds without a fraction, else milliseconds; always ``Z``."""
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(T0 + 0.25) == "2025-06-15T15:06:40.250Z"
