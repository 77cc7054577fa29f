"""NATS subjects of the hub, and pure parsing of the tenant out of a subject."""

from __future__ import annotations

from dataclasses import dataclass

from events.names import DEFAULT_TENANT, TENANT_PATTERN, is_tenant

INGRESS_STREAM = "HUB_INGRESS"
INGRESS_CONSUMER = "hub-ingest"
DLQ_STREAM = "HUB_DLQ"
DLQ_SUBJECT = "hub.dlq"
EVENTS_PREFIX = "hub.events"
QUERY_PREFIX = "hub.query"
# Notifications of alerts: hub.alerts.<tenant>.<severity> (the nats integration).
ALERTS_PREFIX = "hub.alerts"

# Captured by the ingress stream. ".>" (not ".*") so that a malformed tenant such
# as "a.b" is still captured, and so rejected with a reason instead of vanishing.
INGRESS_SUBJECTS = [
    s for kind in ("register", "heartbeat", "deregister") for s in (f"hub.{kind}", f"hub.{kind}.>")
]


@dataclass(frozen=True)
class SubjectRoute:
    """Where a message was sent: its kind (``register``...) and tenant.

    ``tenant_error`` is set when the subject names a tenant that is not a valid
    tenant name (the message is then rejected).
    """

    kind: str
    tenant: str
    tenant_error: str | None = None


def route(subject: str, prefix: str = "hub") -> SubjectRoute:
    """Parse ``<prefix>.<kind>[.<tenant>]`` (ingress) into kind and tenant."""
    parts = subject.split(".")
    if len(parts) < 2 or parts[0] != prefix:
        return SubjectRoute(kind="", tenant=DEFAULT_TENANT, tenant_error=f"bad subject {subject!r}")
    kind = parts[1]
    if len(parts) == 2:
        return SubjectRoute(kind=kind, tenant=DEFAULT_TENANT)
    tenant = ".".join(parts[2:])
    if len(parts) > 3 or not is_tenant(tenant):
        return SubjectRoute(
            kind=kind,
            tenant=DEFAULT_TENANT,
            tenant_error=f"tenant {tenant!r} is not a valid tenant name ({TENANT_PATTERN})",
        )
    return SubjectRoute(kind=kind, tenant=tenant)


def query_route(subject: str) -> SubjectRoute:
    """Parse ``hub.query.<view>[.<tenant>]`` into view (as ``kind``) and tenant."""
    if not subject.startswith(QUERY_PREFIX + "."):
        return SubjectRoute(kind="", tenant=DEFAULT_TENANT, tenant_error=f"bad subject {subject!r}")
    return route(subject[len("hub.") :], prefix="query")


def watch_subject(tenant: str, kind: str) -> str:
    return f"{EVENTS_PREFIX}.{tenant}.{kind}"


def alert_subject(tenant: str, severity: str) -> str:
    """Where the NATS receiver publishes a notification: hub.alerts.<tenant>.<severity>."""
    return f"{ALERTS_PREFIX}.{tenant}.{severity}"


# Silences and acknowledgements are asked by request-reply.
ALERTS_SILENCE_SUBJECT = f"{ALERTS_PREFIX}.silence"
ALERTS_ACK_SUBJECT = f"{ALERTS_PREFIX}.ack"
