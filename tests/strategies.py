"""Hypothesis strategies for the events the log may hold, shared by the tests.

A tiny pool of names, so that events keep colliding on the same instances (and
components); every kind of event the views show, as the wire lets it into the log.
"""

from __future__ import annotations

from hypothesis import strategies as st

from events.model import (
    AlertAcknowledged,
    AlertFiring,
    AlertInhibited,
    AlertPending,
    AlertResolved,
    AlertRulesLoaded,
    AlertUninhibited,
    FlappingEnded,
    FlappingStarted,
    HeartbeatReceived,
    HubSampled,
    InfraChecked,
    InfraConfigLoaded,
    InfraStatusChanged,
    InputRejected,
    InstanceExpired,
    InstanceHealthChanged,
    NotificationDue,
    NotificationFailed,
    NotificationSent,
    SelfPreservationEnded,
    SelfPreservationStarted,
    ServiceDeregistered,
    ServiceRegistered,
    SilenceCreated,
    SilenceExpired,
)

TENANTS = st.sampled_from(["default", "acme"])
SERVICES = st.sampled_from(["orders", "pay.v2"])
INSTANCES = st.sampled_from(["i-1", "i-2", "i_3"])
# Seconds with microsecond resolution, as the ingress stream stamps them.
TS = st.integers(1_700_000_000_000_000, 1_800_000_000_000_000).map(lambda k: k / 1_000_000)
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
FINITE = st.floats(allow_nan=False, allow_infinity=False)  # 1e16 and -0.0 included
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), FINITE, TEXT)
METADATA = st.dictionaries(TEXT.filter(bool), SCALARS, max_size=4)
ENVELOPE = {"event_id": st.just(""), "tenant": TENANTS, "ts": TS}

REGISTERED = st.builds(
    ServiceRegistered, **ENVELOPE, service_name=SERVICES, instance_id=INSTANCES,
    host=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9.:%\[\]-]{0,15}\Z"),
    port=st.integers(1, 65535), protocol=st.from_regex(r"\A[a-z][a-z0-9+.-]{0,15}\Z"),
    version=st.from_regex(r"\A[A-Za-z0-9._+-]{0,10}\Z"),
    health_endpoint=st.from_regex(r"\A/[\x21-\x7e]{0,10}\Z"), metadata=METADATA,
    transport_preferences=st.lists(st.sampled_from(["nats", "kafka", "http", "grpc"]),
                                   max_size=3),
    heartbeat_interval_s=st.floats(0, 3600, exclude_min=True),
    depends_on=st.lists(SERVICES, max_size=2),
    ttl_s=st.floats(0, 3600), expire_after_s=st.floats(0, 3600),
)  # fmt: skip
HEARTBEAT = st.builds(
    HeartbeatReceived, **ENVELOPE, service_name=SERVICES, instance_id=INSTANCES,
    status=st.sampled_from(["healthy", "degraded", "unhealthy"]),
    load=st.none() | st.floats(min_value=0, allow_infinity=False),
    checks=st.dictionaries(TEXT.filter(bool), SCALARS, max_size=2), last_seen=st.just(0.0) | TS,
)  # fmt: skip
DEREGISTERED = st.builds(
    ServiceDeregistered, **ENVELOPE, service_name=SERVICES, instance_id=INSTANCES,
    reason=st.sampled_from(["requested", "expired"]),
)  # fmt: skip
REJECTED = st.builds(
    InputRejected, event_id=st.just(""), tenant=TENANTS | st.just("_invalid"), ts=TS,
    subject=st.sampled_from(["hub.register", "hub.heartbeat", "hub.acme.register"]),
    reason_code=st.sampled_from(["INVALID_FIELD", "MALFORMED_JSON", "UNKNOWN_TENANT"]),
    reason=TEXT, excerpt=TEXT,
)  # fmt: skip
STATUS = st.sampled_from(["healthy", "degraded", "unhealthy", "critical"])
INSTANCE = {**ENVELOPE, "service_name": SERVICES, "instance_id": INSTANCES}
HEALTH = st.one_of(
    st.builds(InstanceHealthChanged, **INSTANCE, previous=STATUS, status=STATUS, reason=TEXT,
              last_seen=TS),
    st.builds(InstanceExpired, **INSTANCE, last_seen=TS, critical_since=TS, reason=TEXT),
    st.builds(FlappingStarted, **INSTANCE, changes=st.integers(0, 9), window_s=FINITE,
              status=STATUS),
    st.builds(FlappingEnded, **INSTANCE, previous=STATUS, status=STATUS,
              quiet_s=st.floats(0, 1e6)),
    st.builds(SelfPreservationStarted, **ENVELOPE, critical=st.integers(0, 9),
              live=st.integers(0, 9), share=st.floats(0, 1), until=TS,
              at_risk=st.lists(TEXT, max_size=2)),
    st.builds(SelfPreservationEnded, **ENVELOPE, reason=st.sampled_from(["bound_reached",
              "recovered"]), critical=st.integers(0, 9), live=st.integers(0, 9)),
)  # fmt: skip
COMPONENTS = st.sampled_from(["pg", "kafka", "nats-1"])
INFRA_ENVELOPE = {**ENVELOPE, "tenant": st.just("_infra")}
INFRA = st.one_of(
    st.builds(InfraChecked, **INFRA_ENVELOPE, component=COMPONENTS,
              status=st.sampled_from(["HEALTHY", "UNHEALTHY"]), response_time_ms=FINITE,
              error=TEXT, metadata=METADATA, consecutive_failures=st.integers(0, 5)),
    st.builds(InfraStatusChanged, **INFRA_ENVELOPE, component=COMPONENTS,
              previous=st.sampled_from(["UNKNOWN", "HEALTHY", "UNHEALTHY"]),
              status=st.sampled_from(["HEALTHY", "UNHEALTHY"]), reason=TEXT,
              consecutive_failures=st.integers(0, 5)),
    st.builds(InfraConfigLoaded, **INFRA_ENVELOPE, source=TEXT, digest=TEXT.filter(bool),
              components=st.lists(COMPONENTS, unique=True).map(
                  lambda ns: [{"name": n, "port": 1, "critical": True} for n in ns]),
              service_dependencies=st.dictionaries(SERVICES, st.lists(COMPONENTS, max_size=2),
                                                   max_size=2)),
)  # fmt: skip
FINGERPRINTS = st.sampled_from(["f1", "f2", "f3"])
LABELS = st.dictionaries(st.sampled_from(["alertname", "service", "component"]), TEXT, max_size=3)
SEVERITY = st.sampled_from(["critical", "warning", "info"])
ALERT = {
    "fingerprint": FINGERPRINTS,
    "rule": st.sampled_from(["Down", "Lag"]),
    "severity": SEVERITY,
    "labels": LABELS,
    "annotations": LABELS,
    # A few starts, so that an alert's events often name the same episode.
    "active_since": st.sampled_from([1_750_000_000.0, 1_750_000_060.25]) | TS,
}
NOTIFICATION = {
    "notification_id": st.sampled_from(["n1", "n2"]),
    "receiver": st.sampled_from(["default/log/0", "ops/webhook/0"]),
}
# One strategy per alert event type (the codec test checks every type has one).
ALERT_STRATEGIES = {
    AlertRulesLoaded: st.builds(AlertRulesLoaded,
        **ENVELOPE, source=TEXT, digest=TEXT.filter(bool)),
    AlertPending: st.builds(AlertPending, **ENVELOPE, **ALERT, value=st.one_of(st.none(), FINITE)),
    AlertFiring: st.builds(AlertFiring, **ENVELOPE, **ALERT, value=st.one_of(st.none(), FINITE)),
    AlertResolved: st.builds(AlertResolved, **ENVELOPE, **ALERT, fired=st.booleans(), reason=TEXT),
    AlertInhibited: st.builds(AlertInhibited, **ENVELOPE, fingerprint=FINGERPRINTS, by=FINGERPRINTS,
              by_rule=TEXT, reason=TEXT),
    AlertUninhibited: st.builds(AlertUninhibited,
        **ENVELOPE, fingerprint=FINGERPRINTS, by=FINGERPRINTS),
    AlertAcknowledged: st.builds(AlertAcknowledged,
        **ENVELOPE, fingerprint=FINGERPRINTS, author=TEXT,
              comment=TEXT),
    SilenceCreated: st.builds(SilenceCreated, **ENVELOPE, silence_id=st.sampled_from(["s1", "s2"]),
              matchers=st.just([{"name": "alertname", "op": "=", "value": "Down"}]),
              starts_at=TS, ends_at=TS, created_by=TEXT, comment=TEXT),
    SilenceExpired: st.builds(SilenceExpired, **ENVELOPE, silence_id=st.sampled_from(["s1", "s2"]),
              reason=TEXT),
    NotificationDue: st.builds(NotificationDue, **ENVELOPE, **NOTIFICATION, group_key=TEXT,
              group_labels=LABELS, epoch=st.integers(0, 3), severity=SEVERITY),
    NotificationSent: st.builds(NotificationSent,
        **ENVELOPE, **NOTIFICATION, attempt=st.integers(1, 3),
              detail=TEXT),
    NotificationFailed: st.builds(NotificationFailed,
        **ENVELOPE, **NOTIFICATION, attempt=st.integers(1, 3),
              error=TEXT, next_attempt_at=st.just(0.0) | TS),
    HubSampled: st.builds(HubSampled, **ENVELOPE, values=st.dictionaries(
        st.sampled_from(["projection_lag_s", "ingress_pending"]), FINITE, max_size=2)),
}  # fmt: skip
ALERTS = st.one_of(*ALERT_STRATEGIES.values())
EVENTS = st.one_of(
    REGISTERED,
    REGISTERED,
    HEARTBEAT,
    HEARTBEAT,
    DEREGISTERED,
    REJECTED,
    HEALTH,
    HEALTH,
    INFRA,
    INFRA,
    ALERTS,  # once: a state machine's rule with EVENTS twice over had a repr hypothesis refuses
)
