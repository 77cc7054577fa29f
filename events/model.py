"""The event types: a tagged union of msgspec Structs with a common envelope.

Rules (schema evolution): events are immutable facts, named in the past tense;
a new field always gets a default; a field's type never changes. The tag (the
``type`` field on the wire) is the class name and never changes either.
"""

from __future__ import annotations

from typing import Any, ClassVar, get_args

import msgspec

from events.vocab import Health

SCHEMA_VERSION = 1


class Event(msgspec.Struct, tag_field="type", tag=True, kw_only=True, frozen=True):
    """Envelope shared by every event.

    Attributes:
        event_id: deterministic id; for ingress-derived events ``ingress-<seq>``,
            so a re-delivered ingress message yields the same id.
        tenant: the tenant the event belongs to.
        ts: event time, seconds since the epoch (for ingress events: the time the
            ingress stream stored the message, so re-processing is deterministic).
        ingress_seq: sequence number of the ingress message this event answers,
            0 for events decided by the hub's own timers.
        schema: envelope schema version.

    Class attributes (not fields), set by each event type:
        kind: the type's short name in watch subjects (``hub.events.<tenant>.<kind>``)
            and in the health history; every type names its own.
        announced: whether the hub announces recorded events of the type on their watch
            subject (not the bulk: heartbeats, check results).
    """

    kind: ClassVar[str]
    announced: ClassVar[bool] = True

    event_id: str
    tenant: str
    ts: float
    ingress_seq: int = 0
    schema: int = SCHEMA_VERSION


class ServiceRegistered(Event, frozen=True):
    """An instance of a service announced itself (or re-announced, idempotently)."""

    kind: ClassVar[str] = "registered"

    service_name: str
    instance_id: str
    host: str
    port: int
    protocol: str = "http"
    version: str = ""
    health_endpoint: str = "/health"
    metadata: dict[str, Any] = {}
    transport_preferences: list[str] = []
    heartbeat_interval_s: float = 10.0
    depends_on: list[str] = []
    # The lease, resolved when the registration was recorded (so replay never
    # depends on the hub's configuration): no heartbeat for ttl_s -> critical;
    # critical for expire_after_s -> expired. 0 = not recorded (3 x interval / 60 s).
    ttl_s: float = 0.0
    expire_after_s: float = 0.0


class ServiceDeregistered(Event, frozen=True):
    """An instance left the registry."""

    kind: ClassVar[str] = "deregistered"

    service_name: str
    instance_id: str
    reason: str = "requested"


class HeartbeatReceived(Event, frozen=True):
    """A registered instance proved it is alive and reported its own health.

    Heartbeats are the bulk of the log, so the log keeps only the latest one per
    instance (JetStream roll-up, Kafka compaction; see ``events.log``). That is
    exact because a heartbeat's effect is overwritten by the next one's:
    ``last_seen`` is the running maximum up to this heartbeat (decided when it was
    recorded), and ``status``/``load``/``checks`` are the latest report. The
    instance's *health* is not set here but by ``InstanceHealthChanged``.
    """

    kind: ClassVar[str] = "heartbeat"
    announced: ClassVar[bool] = False

    service_name: str
    instance_id: str
    status: str = Health.HEALTHY
    load: float | None = None
    checks: dict[str, Any] = {}
    last_seen: float = 0.0  # max(ts, the instance's last_seen before); 0 = use ts


class InstanceHealthChanged(Event, frozen=True):
    """The hub changed an instance's health: reported by the instance, or decided by
    its lease timer (``critical``: no heartbeat within the TTL)."""

    kind: ClassVar[str] = "health_changed"

    service_name: str
    instance_id: str
    previous: str
    status: str
    reason: str
    last_seen: float = 0.0


class InstanceExpired(Event, frozen=True):
    """An instance stayed critical past its expiry time and left the live view."""

    kind: ClassVar[str] = "expired"

    service_name: str
    instance_id: str
    last_seen: float
    critical_since: float
    reason: str = ""


class FlappingStarted(Event, frozen=True):
    """The instance changed health too often; single changes are not recorded until
    it is stable again. ``status`` is its health when flapping was detected."""

    kind: ClassVar[str] = "flapping_started"

    service_name: str
    instance_id: str
    changes: int
    window_s: float
    status: str


class FlappingEnded(Event, frozen=True):
    """The instance was stable for the quiet period; ``status`` is its health now."""

    kind: ClassVar[str] = "flapping_ended"

    service_name: str
    instance_id: str
    previous: str
    status: str
    quiet_s: float


class SelfPreservationStarted(Event, frozen=True):
    """Too large a share of a tenant's instances went critical at once, which looks
    like the hub being cut off rather than the services dying: no instance of the
    tenant expires until ``until`` (a bound: it ends by itself)."""

    kind: ClassVar[str] = "self_preservation_started"

    critical: int
    live: int
    share: float
    until: float
    at_risk: list[str] = []  # "service/instance", at most the first 100


class SelfPreservationEnded(Event, frozen=True):
    """Expiry resumes for the tenant (``reason``: ``bound_reached`` or ``recovered``)."""

    kind: ClassVar[str] = "self_preservation_ended"

    reason: str
    critical: int = 0
    live: int = 0


class InputRejected(Event, frozen=True):
    """Ingress input that the hub refused, with the reason (the payload is in the DLQ)."""

    kind: ClassVar[str] = "rejected"

    subject: str
    reason_code: str
    reason: str
    excerpt: str = ""


class InfraChecked(Event, frozen=True):
    """One result of a check of an infrastructure component (tenant ``_infra``).

    Like heartbeats these are superseded by the next one, so the log keeps the latest
    per component; ``consecutive_failures`` is the running count when it was recorded.
    """

    kind: ClassVar[str] = "infra_checked"
    announced: ClassVar[bool] = False

    component: str
    status: str  # InfraStatus: HEALTHY | UNHEALTHY
    response_time_ms: float
    error: str = ""
    metadata: dict[str, Any] = {}
    consecutive_failures: int = 0


class InfraStatusChanged(Event, frozen=True):
    """A component's status changed (UNKNOWN until its first result; to UNHEALTHY from
    HEALTHY only after the configured number of consecutive failures)."""

    kind: ClassVar[str] = "infra_status_changed"

    component: str
    previous: str
    status: str
    reason: str
    consecutive_failures: int = 0


class InfraConfigLoaded(Event, frozen=True):
    """The monitored components were (re)loaded; components not listed leave the views.

    ``components``: one entry per component: name, section, type, host, port,
    critical, method, interval_s, dependencies, description.
    """

    kind: ClassVar[str] = "infra_config_loaded"

    source: str
    digest: str
    components: list[dict[str, Any]] = []
    service_dependencies: dict[str, list[str]] = {}


# --- alerts (handlers.alerts) ---------------------------------------------------------
# An alert is identified by its fingerprint (``handlers.alert_rules.fingerprint``: the rule
# and its labels); there is at most one active alert per fingerprint. Its tenant is the
# tenant of what it is about (``_infra`` for components, ``_hub`` for the hub itself).


class AlertRulesLoaded(Event, frozen=True):
    """The alerting configuration (rules, route, receivers, inhibit rules) decisions are
    taken with from now on, as validated data (``handlers.alert_rules.AlertingConfig``)."""

    kind: ClassVar[str] = "alert_rules_loaded"

    source: str
    digest: str
    config: dict[str, Any] = {}


class AlertPending(Event, frozen=True):
    """A rule's condition became true; the alert fires if it holds for the rule's ``for``."""

    kind: ClassVar[str] = "alert_pending"

    fingerprint: str
    rule: str
    severity: str
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    active_since: float = 0.0
    value: float | None = None


class AlertFiring(Event, frozen=True):
    """The condition held for the rule's ``for``: the alert fires (and is notified)."""

    kind: ClassVar[str] = "alert_firing"

    fingerprint: str
    rule: str
    severity: str
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    active_since: float = 0.0
    value: float | None = None
    recorded_late: bool = False  # decided while the log was down, recorded once it was back


class AlertResolved(Event, frozen=True):
    """The condition is no longer true. ``fired``: False for an alert that was pending only
    (nobody was told of it, nobody is told it ended)."""

    kind: ClassVar[str] = "alert_resolved"

    fingerprint: str
    rule: str
    severity: str
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    active_since: float = 0.0
    fired: bool = True
    reason: str = ""
    recorded_late: bool = False


class AlertInhibited(Event, frozen=True):
    """An active alert is muted by another (``by``: its fingerprint), through an
    inhibit rule or because what it depends on is down (``reason`` says which)."""

    kind: ClassVar[str] = "alert_inhibited"

    fingerprint: str
    by: str
    by_rule: str
    reason: str


class AlertUninhibited(Event, frozen=True):
    """The inhibiting alert ``by`` is no longer active: the alert counts again."""

    kind: ClassVar[str] = "alert_uninhibited"

    fingerprint: str
    by: str


class AlertAcknowledged(Event, frozen=True):
    """Someone took the alert: its notifications are not repeated until it resolves."""

    kind: ClassVar[str] = "alert_acknowledged"

    fingerprint: str
    author: str
    comment: str = ""


class SilenceCreated(Event, frozen=True):
    """Alerts matching every matcher are not notified between ``starts_at`` and
    ``ends_at`` (Alertmanager's silences). ``matchers``: ``{"name", "op", "value"}``."""

    kind: ClassVar[str] = "silence_created"

    silence_id: str
    matchers: list[dict[str, str]]
    starts_at: float
    ends_at: float
    created_by: str
    comment: str = ""


class SilenceExpired(Event, frozen=True):
    """A silence ended: at its end time, or expired early by someone."""

    kind: ClassVar[str] = "silence_expired"

    silence_id: str
    reason: str = "ended"
    expired_by: str = ""


class NotificationDue(Event, frozen=True):
    """One notification of a group to one receiver, to be sent (the outbox).

    ``notification_id`` is derived from the receiver, the group key, the firing and
    resolved sets and the repeat epoch, so the same notification is never due twice.
    ``firing``/``resolved``: one entry per alert (fingerprint, rule, severity, labels,
    annotations, active_since[, resolved_at]). ``root_cause``: for an alert whose
    dependents' alerts it inhibits, the source and the impacted services.
    """

    kind: ClassVar[str] = "notification_due"

    notification_id: str
    receiver: str
    group_key: str
    group_labels: dict[str, str] = {}
    firing: list[dict[str, Any]] = []
    resolved: list[dict[str, Any]] = []
    epoch: int = 0
    severity: str = ""
    out_of_band: bool = False  # said while the log was down, before it could be recorded


class NotificationSent(Event, frozen=True):
    """The receiver took the notification (``attempt``: 1 for the first try)."""

    kind: ClassVar[str] = "notification_sent"

    notification_id: str
    receiver: str
    attempt: int = 1
    detail: str = ""
    out_of_band: bool = False  # sent while the log was down, before it was recorded


class NotificationFailed(Event, frozen=True):
    """A try failed; the next is at ``next_attempt_at`` (0: given up)."""

    kind: ClassVar[str] = "notification_failed"

    notification_id: str
    receiver: str
    attempt: int
    error: str
    next_attempt_at: float = 0.0


class HubSampled(Event, frozen=True):
    """What the hub measured of itself (tenant ``_hub``), for the alert rules on it:
    ``values`` by gauge name (``handlers.alert_rules.GAUGES``). Superseded by the next
    sample, like check results."""

    kind: ClassVar[str] = "hub_sampled"
    announced: ClassVar[bool] = False

    values: dict[str, float] = {}


AlertEvent = (
    AlertRulesLoaded
    | AlertPending
    | AlertFiring
    | AlertResolved
    | AlertInhibited
    | AlertUninhibited
    | AlertAcknowledged
    | SilenceCreated
    | SilenceExpired
    | NotificationDue
    | NotificationSent
    | NotificationFailed
    | HubSampled
)

# Events about an instance's health, kept in the health history.
HealthEvent = (
    InstanceHealthChanged
    | InstanceExpired
    | FlappingStarted
    | FlappingEnded
    | SelfPreservationStarted
    | SelfPreservationEnded
)
InfraEvent = InfraChecked | InfraStatusChanged | InfraConfigLoaded

# The one list of event types: adding one is its class (with its ``kind``) and a line
# in this union (or a group above); the tuples and tables below derive from it.
AnyEvent = (
    ServiceRegistered
    | ServiceDeregistered
    | HeartbeatReceived
    | InputRejected
    | HealthEvent
    | InfraEvent
    | AlertEvent
)

EVENT_TYPES: tuple[type[Event], ...] = get_args(AnyEvent)
HEALTH_EVENTS: tuple[type[Event], ...] = get_args(HealthEvent)
INFRA_EVENTS: tuple[type[Event], ...] = get_args(InfraEvent)
ALERT_EVENTS: tuple[type[Event], ...] = get_args(AlertEvent)

# The short name of each event type in watch subjects: hub.events.<tenant>.<kind>.
WATCH_KIND: dict[type[Event], str] = {t: t.kind for t in EVENT_TYPES}
# The types the hub announces on their watch subject once recorded.
ANNOUNCED: frozenset[type[Event]] = frozenset(t for t in EVENT_TYPES if t.announced)


def partition_key(event: Event) -> str:
    """The ordering key of an event in the log: tenant/service/instance.

    Every event about one instance shares a key, so a keyed log (Kafka) keeps
    them in order. Every alerting event (``ALERTS_KEY``: alerts, silences, notifications,
    the rules; not the hub's samples) shares one key whatever its tenant: the alert
    fold (the hub's after a restart, the views') depends on their order across alerts,
    since a group's notification lists several, and a silence mutes some of them.
    Events that are about none of these (infrastructure events included: they stay in
    order with the configuration that lists them) are keyed by tenant.
    """
    service = getattr(event, "service_name", None)
    instance = getattr(event, "instance_id", None)
    if service is not None and instance is not None:
        return f"{event.tenant}/{service}/{instance}"
    if isinstance(event, _ALERT_KEYED):
        return ALERTS_KEY
    return f"{event.tenant}/-"


ALERTS_KEY = "alerts/-"
_ALERT_KEYED = tuple(t for t in ALERT_EVENTS if t is not HubSampled)


def compaction_key(event: Event) -> str | None:
    """The key under which the log keeps only the latest event, or None to keep it.

    Only heartbeats and check results are superseded (by the next heartbeat of the same
    instance, the next result for the same component); every other event is a fact the
    log keeps for ever. The key is ``<what>/<subject>`` (``superseded_subject``).
    """
    if isinstance(event, HeartbeatReceived):
        return f"hb/{partition_key(event)}"
    if isinstance(event, InfraChecked):
        return f"infra/{event.tenant}/{event.component}"
    if isinstance(event, HubSampled):
        return f"sample/{event.tenant}/-"
    return None


def superseded_subject(event: Event) -> str | None:
    """What a superseded event is the latest record of: its instance
    (``tenant/service/instance``) or component (``tenant/component``); None for an
    event the log keeps (no ``compaction_key``)."""
    key = compaction_key(event)
    return None if key is None else key.partition("/")[2]
