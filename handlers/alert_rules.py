"""The alerting configuration as typed data (pure), with Alertmanager's meanings.

* **Rules** say when an alert is active: a ``source`` (what the hub watches), optional
  ``matchers`` on the source's labels, a ``threshold`` for the gauges, the ``for``
  duration, a ``severity``, ``labels`` and ``annotations`` (``{name}`` placeholders are
  filled from the alert's labels and ``{value}``).
* The **route** tree sends alerts to receivers, grouped: ``group_by``, ``group_wait``,
  ``group_interval``, ``repeat_interval`` and child ``routes`` with ``matchers`` and
  ``continue``, as in Alertmanager (a child inherits what it does not set).
* **Receivers** (named, as routes refer to them) each have integrations: ``log``,
  ``nats``, ``webhook`` (``email`` is an extension point).
* **Inhibit rules**: ``source_matchers``, ``target_matchers``, ``equal``; plus, unless
  ``derive_inhibitions`` is off, inhibition derived from the dependency graph.

The file format (YAML) and its validation are ``hub.alerts.rules``; what is here is
what the core decides with, recorded as ``AlertRulesLoaded`` so that replay and
``hub alerts simulate`` decide with the same rules.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Literal, get_args

import msgspec

Severity = Literal["critical", "warning", "info"]
SEVERITIES: tuple[str, ...] = get_args(Severity)  # most severe first

# What a rule can watch, and the labels each source gives its alerts (besides
# ``alertname``, ``severity`` and ``tenant``).
Source = Literal[
    "infra_unhealthy",  # a monitored component is UNHEALTHY           component, section, type
    "service_degraded",  # a service's health is DEGRADED               service
    "service_unhealthy",  # a service's health is UNHEALTHY             service
    "instance_critical",  # an instance missed its lease                service, instance
    "instance_expired",  # an instance expired (until it registers again)  service, instance
    "instance_flapping",  # an instance is flapping                     service, instance
    "self_preservation",  # a tenant is in self-preservation             (tenant)
    "projection_lag_records",  # a view is this many records behind the log  (gauge)
    "projection_lag_s",  # a view is this many seconds behind the log   (gauge)
    "ingress_pending",  # messages waiting in ingress                    (gauge)
    "ingress_oldest_age_s",  # age of the oldest message in ingress       (gauge)
    "dead_letters_per_min",  # rejected input per minute                  (gauge)
    "event_log_down",  # the event log cannot be written                  log
]
SOURCES: tuple[str, ...] = get_args(Source)
# Sources measured by the hub (``HubSampled``); a rule on one needs a ``threshold``.
GAUGES: tuple[str, ...] = (
    "projection_lag_records",
    "projection_lag_s",
    "ingress_pending",
    "ingress_oldest_age_s",
    "dead_letters_per_min",
)
SOURCE_LABELS: dict[str, tuple[str, ...]] = {
    "infra_unhealthy": ("component", "section", "type"),
    "service_degraded": ("service",),
    "service_unhealthy": ("service",),
    "instance_critical": ("service", "instance"),
    "instance_expired": ("service", "instance"),
    "instance_flapping": ("service", "instance"),
    "self_preservation": (),
    "event_log_down": ("log",),
    **{g: () for g in GAUGES},
}
ReceiverType = Literal["log", "nats", "webhook", "email"]
MatchOp = Literal["=", "!=", "=~", "!~"]
INFRA_TENANT = "_infra"
HUB_TENANT = "_hub"


class Matcher(msgspec.Struct, frozen=True):
    """``name op value`` on an alert's labels, as Alertmanager's matchers: a regex
    (``=~``, ``!~``) is anchored at both ends; a missing label is the empty string."""

    name: str
    op: MatchOp
    value: str

    def matches(self, labels: Mapping[str, str]) -> bool:
        have = labels.get(self.name, "")
        match self.op:
            case "=":
                return have == self.value
            case "!=":
                return have != self.value
            case "=~":
                return _anchored(self.value).match(have) is not None
            case _:
                return _anchored(self.value).match(have) is None

    def to_data(self) -> dict[str, str]:
        return {"name": self.name, "op": self.op, "value": self.value}


@lru_cache(maxsize=1024)
def _anchored(pattern: str) -> re.Pattern[str]:
    return re.compile(rf"(?:{pattern})\Z")


def matches_all(matchers: tuple[Matcher, ...] | list[Matcher], labels: Mapping[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)


class Rule(msgspec.Struct, frozen=True, kw_only=True):
    """When an alert is active. ``for_s``: how long before it fires (0: at once)."""

    name: str
    source: Source
    severity: Severity = "warning"
    for_s: float = 0.0
    threshold: float | None = None  # gauges: active while the value is above it
    matchers: tuple[Matcher, ...] = ()
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """A node of the route tree. ``None`` fields are inherited from the parent."""

    receiver: str | None = None
    group_by: tuple[str, ...] | None = None  # ("...",): every label (no grouping)
    group_wait_s: float | None = None
    group_interval_s: float | None = None
    repeat_interval_s: float | None = None
    matchers: tuple[Matcher, ...] = ()
    continue_: bool = msgspec.field(default=False, name="continue")
    routes: tuple[Route, ...] = ()


class Integration(msgspec.Struct, frozen=True, kw_only=True):
    """One way a receiver is told (Alertmanager's ``webhook_configs`` & co.); each has
    its own outbox queue, so a failing one never holds up another.

    Attributes:
        type: ``log`` (a structlog line), ``nats`` (``hub.alerts.<tenant>.<severity>``),
            ``webhook`` (HTTP POST), ``email`` (an extension point: refused for now).
        url, headers, timeout_s: the webhook's endpoint.
        send_resolved: notify when alerts resolve.
        send_resolved_when_silenced: notify a resolve even while the alert is silenced
            (Alertmanager drops it; a resolved alert is news worth having).
        rate_per_s, burst: the token bucket of the integration (0: no limit).
        max_attempts: tries before a notification is given up (recorded as failed).
        backoff_s, max_backoff_s: retry delays (doubling, with jitter), unless the
            receiver says when (``Retry-After``).
    """

    type: ReceiverType
    url: str = ""
    headers: dict[str, str] = {}
    timeout_s: float = 10.0
    send_resolved: bool = True
    send_resolved_when_silenced: bool = True
    rate_per_s: float = 0.0
    burst: int = 10
    max_attempts: int = 10
    backoff_s: float = 1.0
    max_backoff_s: float = 300.0


class Receiver(msgspec.Struct, frozen=True, kw_only=True):
    """A named receiver (what a route sends to) and its integrations."""

    name: str
    integrations: tuple[Integration, ...] = ()

    def targets(self) -> list[tuple[str, Integration]]:
        """``(integration id, integration)``: the id (``<receiver>/<type>/<index>``) is
        what notifications are addressed to."""
        return [(integration_id(self.name, i, x), x) for i, x in enumerate(self.integrations)]


def integration_id(receiver: str, index: int, integration: Integration) -> str:
    return f"{receiver}/{integration.type}/{index}"


class InhibitRule(msgspec.Struct, frozen=True, kw_only=True):
    """While an alert matching ``source_matchers`` fires, alerts matching
    ``target_matchers`` with the same values of the ``equal`` labels are inhibited."""

    source_matchers: tuple[Matcher, ...] = ()
    target_matchers: tuple[Matcher, ...] = ()
    equal: tuple[str, ...] = ()


DEFAULT_ROUTE = Route(
    receiver="default",
    group_by=("alertname", "tenant"),
    group_wait_s=30.0,
    group_interval_s=300.0,
    repeat_interval_s=4 * 3600.0,
)


class AlertingConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the core decides alerts and notifications with. ``enabled`` False:
    alerting is off (the file's ``enabled: false``): nothing is decided or sent, and what
    was recorded stays as it is."""

    enabled: bool = True
    rules: tuple[Rule, ...] = ()
    route: Route = DEFAULT_ROUTE
    receivers: tuple[Receiver, ...] = ()
    inhibit_rules: tuple[InhibitRule, ...] = ()
    derive_inhibitions: bool = True

    def receiver(self, name: str) -> Receiver | None:
        for r in self.receivers:
            if r.name == name:
                return r
        return None

    def integration(self, target: str) -> Integration | None:
        """The integration a notification is addressed to (``Receiver.targets``)."""
        name, _, _ = target.partition("/")
        receiver = self.receiver(name)
        for t, x in receiver.targets() if receiver else []:
            if t == target:
                return x
        return None

    def to_data(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> AlertingConfig:
        return msgspec.convert(data, cls)


def digest_of(config: AlertingConfig) -> str:
    return hashlib.sha256(msgspec.json.encode(config.to_data())).hexdigest()[:16]


def fingerprint(rule: str, labels: Mapping[str, str]) -> str:
    """The stable identity of an alert: its rule and labels (sorted), hashed."""
    text = "\x00".join([rule, *(f"{k}\x01{v}" for k, v in sorted(labels.items()))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill(template: str, labels: Mapping[str, str], value: float | None) -> str:
    """A template with ``{label}`` and ``{value}`` filled in (unknown names stay as
    written: validation of the file reports them, a template never fails here)."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "value":
            return "" if value is None else f"{value:g}"
        return labels.get(name, m.group(0))

    return _PLACEHOLDER.sub(one, template)


def placeholders(template: str) -> list[str]:
    return _PLACEHOLDER.findall(template)
