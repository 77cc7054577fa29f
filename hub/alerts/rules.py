"""The alerting file: rules, route tree, receivers and inhibit rules, read strictly.

Where the configuration comes from (:func:`load_alerting`), first found wins:

1. the YAML file named by ``HUB_ALERTS_FILE``;
2. the ``alerts:`` section of the infrastructure file (``HUB_INFRA_CONFIG``);
3. the built-in defaults (:func:`default_alerting`).

The keys are Prometheus' (``alert``, ``for``, ``labels``, ``annotations``) and
Alertmanager's (``route``, ``receivers``, ``inhibit_rules``), so configurations port
between them; every key is optional. A file that gives ``rules``, ``receivers`` or
``route`` replaces that part of the defaults and keeps the others. The seed's
``enabled`` and ``channels`` keep working: ``enabled: false`` means no rules at all, and
``channels: [log, nats]`` is the receiver ``default`` with those integrations.

Every mistake is an :class:`AlertConfigError` naming the file, the rule (its alert name
when it has one) and the key path, e.g. ``alerts.yaml: rules[2] (alert "ViewLag"):
threshold: the source projection_lag_s needs a threshold``: a typo must not turn into an
alert that silently never fires. Values are taken as written: nothing is read from the
environment (what is loaded is recorded in the event log as ``AlertRulesLoaded``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import cast

from handlers.alert_rules import (
    DEFAULT_ROUTE,
    GAUGES,
    SEVERITIES,
    SOURCE_LABELS,
    SOURCES,
    AlertingConfig,
    Matcher,
    Route,
    Rule,
    Severity,
    Source,
    placeholders,
)
from hub.alerts._routing import (
    DEFAULT_RECEIVERS,
    check_default_route,
    read_channels,
    read_inhibit_rules,
    read_receivers,
    read_route,
)
from hub.alerts._syntax import (
    LABEL_NAME,
    read_duration,
    read_matchers,
    read_number,
    read_string_map,
)
from hub.infra._reader import InfraConfigError, Node, load_yaml

__all__ = [
    "ALERTS_FILE_ENV",
    "DEFAULTS_SOURCE",
    "DEFAULT_RECEIVERS",
    "DEFAULT_RULES",
    "AlertConfigError",
    "default_alerting",
    "describe_alerting",
    "load_alerting",
    "parse_alerting",
]

ALERTS_FILE_ENV = "HUB_ALERTS_FILE"
DEFAULTS_SOURCE = "<built-in defaults>"
INFRA_SECTION = "alerts"

_TOP_KEYS = ("enabled", "channels", "derive_inhibitions", "rules", "route", "receivers",
             "inhibit_rules")  # fmt: skip
_RULE_KEYS = ("alert", "source", "for", "severity", "threshold", "matchers", "labels",
              "annotations")  # fmt: skip
_ALERT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
# Labels every alert has besides its source's: a template may use them, a rule's own
# labels may not redefine them (alertname and tenant identify the alert).
_ALERT_LABELS = ("alertname", "severity", "tenant")


class AlertConfigError(InfraConfigError):
    """The alerting configuration cannot be used. ``path`` is the full key path
    (``rules[2].threshold``); ``rule`` the alert name of the rule it is in ("" if none)."""

    def __init__(
        self, source: str, path: str, reason: str, *, rule_path: str = "", rule: str = ""
    ) -> None:
        super().__init__(source, path, reason)
        self.rule = rule
        if rule_path:  # "<file>: rules[2] (alert "X"): threshold: <reason>"
            where = f'{rule_path} (alert "{rule}")' if rule else rule_path
            key = path[len(rule_path) :].lstrip(".")
            self.args = (f"{source}: {where}: {key + ': ' if key else ''}{reason}",)


# --- defaults -------------------------------------------------------------------------------

DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(name="HubComponentDown", source="infra_unhealthy", severity="critical",
         annotations={"summary": "{component} is unhealthy"}),
    Rule(name="ServiceUnhealthy", source="service_unhealthy", severity="critical", for_s=30.0,
         annotations={"summary": "service {service} of tenant {tenant} is unhealthy"}),
    Rule(name="InstanceExpired", source="instance_expired", severity="warning",
         annotations={"summary": "instance {instance} of {service} ({tenant}) expired"}),
    Rule(name="ViewLagging", source="projection_lag_s", severity="warning", for_s=60.0,
         threshold=30.0, annotations={"summary": "a view is {value} s behind the event log"}),
    Rule(name="EventLogDown", source="event_log_down", severity="critical",
         annotations={"summary": "the event log ({log}) cannot be written"}),
    Rule(name="SelfPreservation", source="self_preservation", severity="warning",
         annotations={"summary": "tenant {tenant} is in self-preservation"}),
)  # fmt: skip


def default_alerting() -> AlertingConfig:
    """The configuration when nothing is configured: the default rules, to the receiver
    ``default`` (a log line and a NATS message), grouped by ``DEFAULT_ROUTE``."""
    return AlertingConfig(rules=DEFAULT_RULES, route=DEFAULT_ROUTE, receivers=DEFAULT_RECEIVERS)


# --- where it comes from --------------------------------------------------------------------


def load_alerting(
    environ: Mapping[str, str], infra_file: Path | None
) -> tuple[AlertingConfig, str]:
    """The alerting configuration and a description of where it came from.

    ``HUB_ALERTS_FILE`` (in ``environ``) names a file of its own; else the ``alerts:``
    section of ``infra_file`` is used (the file ``HUB_INFRA_CONFIG`` names, if any); else
    the defaults. Only the ``alerts:`` section of the infrastructure file is looked at:
    the rest is the infrastructure reader's business.
    """
    alerts_file = environ.get(ALERTS_FILE_ENV, "").strip()
    if alerts_file:
        data = _load(alerts_file)
        if data is None:
            raise AlertConfigError(
                alerts_file, "", "the file is empty (expected a mapping such as rules: [...]; "
                "write {} for the defaults)",
            )  # fmt: skip
        return parse_alerting(data, alerts_file), alerts_file
    if infra_file is not None:
        source = str(infra_file)
        infra = _load(source)
        section = infra.get(INFRA_SECTION) if isinstance(infra, dict) else None
        if section is not None:
            config = parse_alerting(section, source, path=INFRA_SECTION)
            return config, f"{source} ({INFRA_SECTION} section)"
    return default_alerting(), DEFAULTS_SOURCE


def _load(source: str) -> object:
    """The YAML data of the file ``source``; every failure an :class:`AlertConfigError`."""
    try:
        text = Path(source).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AlertConfigError(source, "", "cannot read: not UTF-8 text") from None
    except OSError as exc:
        raise AlertConfigError(source, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        return load_yaml(text, source)
    except InfraConfigError as exc:
        raise AlertConfigError(exc.source, exc.path, exc.reason) from None


def parse_alerting(data: object, source: str, *, path: str = "") -> AlertingConfig:
    """Check already loaded YAML ``data`` and make it the typed configuration.

    ``source`` names the file in error messages and ``path`` is where ``data`` sits in
    it (``alerts`` for the infrastructure file's section).
    """
    try:
        return _read_alerting(Node(data, path, source, {}))
    except AlertConfigError:
        raise
    except InfraConfigError as exc:
        raise AlertConfigError(exc.source, exc.path, exc.reason) from None


def _read_alerting(root: Node) -> AlertingConfig:
    raw = root.mapping(_TOP_KEYS)
    given = {key: root.child(key) for key in raw}
    for key in ("rules", "route", "receivers"):
        if key in given and given[key].missing:
            given[key].fail(
                f"is empty (null): write {key}: [] for none, or leave {key} out for the defaults"
                if key != "route"
                else "is empty (null): leave route out for the default route"
            )
    if "channels" in given and "receivers" in given:
        given["channels"].fail("give either channels (the older form) or receivers, not both")
    if "receivers" in given:
        receivers = read_receivers(given["receivers"])
    elif "channels" in given:
        receivers = read_channels(given["channels"])
    else:
        receivers = DEFAULT_RECEIVERS
    if "route" in given:
        route = read_route(given["route"], receivers)
    else:
        check_default_route(root.child("route"), receivers)
        route = DEFAULT_ROUTE
    rules = _read_rules(given["rules"]) if "rules" in given else DEFAULT_RULES
    enabled = root.child("enabled").boolean(True)
    return AlertingConfig(
        enabled=enabled,
        rules=rules if enabled else (),
        route=route,
        receivers=receivers,
        inhibit_rules=read_inhibit_rules(root.child("inhibit_rules")),
        derive_inhibitions=root.child("derive_inhibitions").boolean(True),
    )


# --- rules ----------------------------------------------------------------------------------


def _read_rules(node: Node) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    first_seen: dict[str, str] = {}
    for item in node.items():
        rule = _read_rule(item)
        if rule.name in first_seen:
            raise AlertConfigError(
                item.source, item.child("alert").path,
                f"duplicate alert name {rule.name!r} (first at {first_seen[rule.name]})",
                rule_path=item.path, rule=rule.name,
            )  # fmt: skip
        first_seen[rule.name] = item.path
        rules.append(rule)
    return tuple(rules)


def _read_rule(node: Node) -> Rule:
    """One rule; whatever is wrong in it is reported with its alert name."""
    named = node.value.get("alert") if isinstance(node.value, dict) else None
    try:
        return _read_rule_keys(node)
    except InfraConfigError as exc:
        raise AlertConfigError(
            exc.source, exc.path, exc.reason, rule_path=node.path,
            rule=named if isinstance(named, str) else "",
        ) from None  # fmt: skip


def _read_rule_keys(node: Node) -> Rule:
    node.mapping(_RULE_KEYS)
    name_node = node.required("alert")
    name = name_node.string()
    if not _ALERT_NAME.fullmatch(name):
        name_node.fail(f"expected a name of letters, digits and _ . : - , got {name!r}")
    source = _read_source(node.required("source"))
    labels = read_string_map(node.child("labels"), LABEL_NAME, "a label name")
    severity = _read_severity(node, labels.pop("severity", None))
    for label in labels:
        if label in (*_ALERT_LABELS, *SOURCE_LABELS[source]):
            node.child("labels").child(label).fail(
                f"the label {label!r} is set by the hub (from the "
                f"{'alert' if label in _ALERT_LABELS else 'source ' + source}), not by a rule"
            )
    annotations = read_string_map(node.child("annotations"), LABEL_NAME, "an annotation name")
    fillable = (*SOURCE_LABELS[source], *_ALERT_LABELS, "value", *labels)
    for key, templates in (("labels", labels), ("annotations", annotations)):
        for field, template in templates.items():
            _check_placeholders(node.child(key).child(field), template, source, fillable)
    return Rule(
        name=name,
        source=source,
        severity=severity,
        for_s=read_duration(node.child("for"), 0.0),
        threshold=_read_threshold(node.child("threshold"), source),
        matchers=_read_rule_matchers(node.child("matchers"), source),
        labels=labels,
        annotations=annotations,
    )


def _read_source(node: Node) -> Source:
    source = node.string()
    if source not in SOURCES:
        node.fail(f"unknown source {source!r} (expected one of: {', '.join(SOURCES)})")
    return cast(Source, source)


def _read_severity(rule: Node, from_labels: str | None) -> Severity:
    node = rule.child("severity")
    severity = node.string() if not node.missing else from_labels
    if not node.missing and from_labels is not None and from_labels != severity:
        rule.child("labels").child("severity").fail(
            f"{from_labels!r} contradicts severity: {severity!r} (give one of the two)"
        )
    if severity is None:
        return "warning"
    if severity not in SEVERITIES:
        where = node if not node.missing else rule.child("labels").child("severity")
        where.fail(f"unknown severity {severity!r} (expected one of: {', '.join(SEVERITIES)})")
    return cast(Severity, severity)


def _read_threshold(node: Node, source: str) -> float | None:
    if source not in GAUGES:
        if not node.missing:
            node.fail(
                f"the source {source} is a condition, not a measurement: it takes no threshold "
                f"(sources with one: {', '.join(GAUGES)})"
            )
        return None
    if node.missing:
        node.fail(f"the source {source} needs a threshold (the alert is active above it)")
    value = read_number(node, "a number")
    if value < 0:
        node.fail(f"expected a number of at least 0, got {value:g}")
    return value


def _read_rule_matchers(node: Node, source: str) -> tuple[Matcher, ...]:
    """Matchers filter the source's labels, so they can only name those (and tenant)."""
    matchers = read_matchers(node)
    known = (*SOURCE_LABELS[source], "tenant")
    for item, matcher in zip(node.items(), matchers, strict=True):
        if matcher.name not in known:
            item.fail(
                f"the source {source} has no label {matcher.name!r} "
                f"(its labels: {', '.join(known)})"
            )
    return matchers


def _check_placeholders(node: Node, template: str, source: str, fillable: tuple[str, ...]) -> None:
    for name in placeholders(template):
        if name not in fillable:
            node.fail(
                f"placeholder {{{name}}} cannot be filled: an alert of source {source} has "
                f"{', '.join('{' + f + '}' for f in fillable)}"
            )


# --- for logs -------------------------------------------------------------------------------


def describe_alerting(config: AlertingConfig) -> str:
    """One line for the log: ``6 rules; receivers default (log, nats); 1 inhibit rule``."""
    rules = _count(len(config.rules), "rule") if config.rules else "no rules (alerting off)"
    receivers = ", ".join(
        f"{r.name} ({', '.join(x.type for x in r.integrations)})" for r in config.receivers
    )
    parts = [rules, f"receivers {receivers}", _count(_count_routes(config.route), "route")]
    if config.inhibit_rules:
        parts.append(_count(len(config.inhibit_rules), "inhibit rule"))
    if not config.derive_inhibitions:
        parts.append("no derived inhibitions")
    return "; ".join(parts)


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def _count_routes(route: Route) -> int:
    return 1 + sum(_count_routes(child) for child in route.routes)
