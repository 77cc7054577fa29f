"""What a notification says (pure): the body every integration sends, and its subject.

The body is an Alertmanager webhook payload (``version: "4"``), so that tools written
for Alertmanager's webhook receivers read it as they are, plus three fields of our own:
``notificationId`` (the same on every try, and the ``Idempotency-Key`` of a webhook),
``epoch`` (the repeat count of the group) and, when one alert is the root cause of
others, ``rootCause`` (the alert and the services it impacts).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from events.model import NotificationDue
from events.names import is_tenant
from events.subjects import alert_subject
from handlers.alert_rules import HUB_TENANT, INFRA_TENANT, SEVERITIES

WEBHOOK_VERSION = "4"
# Alertmanager's ``endsAt`` of an alert still firing (Go's zero time).
ZERO_TIME = "0001-01-01T00:00:00Z"
_PSEUDO_TENANTS = frozenset({HUB_TENANT, INFRA_TENANT})


def render(due: NotificationDue, *, receiver_name: str) -> dict[str, Any]:
    """The webhook body of ``due`` as sent to the receiver named ``receiver_name``."""
    alerts = [_alert(a, "firing") for a in due.firing]
    alerts += [_alert(a, "resolved") for a in due.resolved]
    body: dict[str, Any] = {
        "version": WEBHOOK_VERSION,
        "groupKey": due.group_key,
        "truncatedAlerts": 0,
        "status": "firing" if due.firing else "resolved",
        "receiver": receiver_name,
        "groupLabels": dict(due.group_labels),
        "commonLabels": _common([a["labels"] for a in alerts]),
        "commonAnnotations": _common([a["annotations"] for a in alerts]),
        "externalURL": "",
        "alerts": alerts,
        "notificationId": due.notification_id,
        "epoch": due.epoch,
    }
    if due.out_of_band:  # said while the event log was down: not (yet) recorded
        body["recorded"] = False
    root_cause = [
        {
            "fingerprint": str(a.get("fingerprint", "")),
            "alertname": _labels(a)["alertname"],
            "impacted": list(a["impacted"]),
        }
        for a in [*due.firing, *due.resolved]
        if a.get("impacted")
    ]
    if root_cause:
        body["rootCause"] = root_cause
    return body


def subject_for(due: NotificationDue) -> str:
    """``hub.alerts.<tenant>.<severity>``: the group's tenant, else the one tenant all its
    alerts share, else ``_hub``; the notification's severity, else the most severe of
    its alerts."""
    return alert_subject(_tenant(due), _severity(due))


def alertnames(due: NotificationDue) -> list[str]:
    """The distinct alert names of ``due``, in order of appearance (for log lines)."""
    names = [_labels(a)["alertname"] for a in [*due.firing, *due.resolved]]
    return list(dict.fromkeys(names))


def rfc3339(ts: float) -> str:
    """``ts`` (epoch seconds) as RFC 3339 in UTC; milliseconds only when there are any."""
    when = dt.datetime.fromtimestamp(ts, dt.UTC)
    spec = "seconds" if ts == int(ts) else "milliseconds"
    return when.isoformat(timespec=spec).replace("+00:00", "Z")


def _alert(entry: Mapping[str, Any], status: str) -> dict[str, Any]:
    ends = entry.get("resolved_at") if status == "resolved" else None
    return {
        "status": status,
        "labels": _labels(entry),
        "annotations": {str(k): str(v) for k, v in dict(entry.get("annotations") or {}).items()},
        "startsAt": rfc3339(float(entry.get("active_since") or 0.0)),
        "endsAt": ZERO_TIME if ends is None else rfc3339(float(ends)),
        "fingerprint": str(entry.get("fingerprint", "")),
    }


def _labels(entry: Mapping[str, Any]) -> dict[str, str]:
    """The alert's labels; ``alertname`` and ``severity`` from the entry when missing
    (Alertmanager's receivers count on ``alertname``)."""
    labels = {str(k): str(v) for k, v in dict(entry.get("labels") or {}).items()}
    labels.setdefault("alertname", str(entry.get("rule", "")))
    if entry.get("severity"):
        labels.setdefault("severity", str(entry["severity"]))
    return labels


def _common(maps: list[dict[str, str]]) -> dict[str, str]:
    """The pairs every map has (Alertmanager's ``commonLabels``); {} for no maps."""
    if not maps:
        return {}
    first, *rest = maps
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in rest)}


def _tenant(due: NotificationDue) -> str:
    tenant = due.group_labels.get("tenant")
    if tenant is None:
        tenants = {_labels(a).get("tenant") for a in [*due.firing, *due.resolved]}
        tenant = tenants.pop() if len(tenants) == 1 else None
    # A subject token must be a tenant name: a label with a dot or a space is not one.
    if tenant is None or not (is_tenant(tenant) or tenant in _PSEUDO_TENANTS):
        return HUB_TENANT
    return tenant


def _severity(due: NotificationDue) -> str:
    if due.severity in SEVERITIES:
        return due.severity
    given = {str(a.get("severity", "")) for a in [*due.firing, *due.resolved]}
    return next((s for s in SEVERITIES if s in given), SEVERITIES[-1])
