"""The alerting file (``hub.alerts.rules``): a full file parses to the structs it says,
missing sections keep the defaults, ``HUB_ALERTS_FILE`` wins over the infrastructure
file's ``alerts:`` section, and every mistake fails naming the file, the rule and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.alert_rules import (
    DEFAULT_ROUTE,
    GAUGES,
    SOURCES,
    Integration,
    Matcher,
    Receiver,
    Route,
    Rule,
)
from hub.alerts.rules import (
    ALERTS_FILE_ENV,
    DEFAULT_RECEIVERS,
    DEFAULT_RULES,
    DEFAULTS_SOURCE,
    AlertConfigError,
    default_alerting,
    describe_alerting,
    load_alerting,
    parse_alerting,
)

FULL = """
enabled: true
derive_inhibitions: false
rules:
  - alert: KafkaDown
    source: infra_unhealthy
    for: 1h30m
    severity: critical
    matchers: ['component=~"kafka.*"', {name: section, op: "!=", value: search}]
    labels: {team: infra, page: "{component}"}
    annotations: {summary: "{component} is down", description: "{team}: {value} ({tenant})"}
  - alert: ViewLag
    source: projection_lag_s
    threshold: 1000
    for: 2.5
    labels: {severity: info}
route:
  receiver: default
  group_by: ['...']
  group_wait: 10s
  repeat_interval: 1d
  routes:
    - matchers: ['severity="critical"']
      receiver: pager
      continue: true
      group_by: [alertname, service]
      routes:
        - match: {team: infra}
          match_re: {service: "a|b"}
          group_wait: 0
          group_interval: 500ms
receivers:
  - name: default
    log_configs: [{}]
    nats_configs: [{send_resolved: false}]
  - name: pager
    webhook_configs:
      - url: "https://hooks.example:9000/hook"
        send_resolved: true
        send_resolved_when_silenced: false
        max_attempts: 3
        timeout: 5s
        headers: {X-Token: abc}
        rate_limit: {per_second: 5, burst: 20}
        backoff: 2s
        max_backoff: 5m
inhibit_rules:
  - source_matchers: ['severity="critical"']
    target_matchers: [severity=warning]
    equal: [tenant, service]
  - source_match: {alertname: EventLogDown}
    target_match_re: {alertname: "View.*"}
"""


def write(tmp_path: Path, text: str, name: str = "alerts.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def from_file(path: Path) -> Any:
    return load_alerting({ALERTS_FILE_ENV: str(path)}, None)


def test_full_file_parses_to_the_structs_it_says(tmp_path: Path) -> None:
    """Every key of a full file lands in its field: rule durations in seconds, severity
    from labels, matchers of both spellings, inherited (None) fields of child routes,
    legacy match/match_re, webhook settings, inhibit rules."""
    path = write(tmp_path, FULL)
    config, source = from_file(path)
    assert source == str(path)
    kafka, lag = config.rules
    assert kafka == Rule(
        name="KafkaDown", source="infra_unhealthy", severity="critical", for_s=5400.0,
        matchers=(Matcher(name="component", op="=~", value="kafka.*"),
                  Matcher(name="section", op="!=", value="search")),
        labels={"team": "infra", "page": "{component}"},
        annotations={"summary": "{component} is down",
                     "description": "{team}: {value} ({tenant})"},
    )  # fmt: skip
    assert (lag.severity, lag.threshold, lag.for_s, lag.labels) == ("info", 1000.0, 2.5, {})
    critical = Route(
        receiver="pager", group_by=("alertname", "service"), continue_=True,
        matchers=(Matcher(name="severity", op="=", value="critical"),),
        routes=(Route(
            group_wait_s=0.0, group_interval_s=0.5,
            matchers=(Matcher(name="team", op="=", value="infra"),
                      Matcher(name="service", op="=~", value="a|b")),
        ),),
    )  # fmt: skip
    assert config.route == Route(
        receiver="default", group_by=("...",), group_wait_s=10.0,
        group_interval_s=DEFAULT_ROUTE.group_interval_s, repeat_interval_s=86400.0,
        routes=(critical,),
    )  # fmt: skip
    assert config.receivers[0] == Receiver(
        name="default",
        integrations=(Integration(type="log"), Integration(type="nats", send_resolved=False)),
    )
    assert config.integration("pager/webhook/0") == Integration(
        type="webhook", url="https://hooks.example:9000/hook", send_resolved=True,
        send_resolved_when_silenced=False, max_attempts=3, timeout_s=5.0,
        headers={"X-Token": "abc"}, rate_per_s=5.0, burst=20, backoff_s=2.0,
        max_backoff_s=300.0,
    )  # fmt: skip
    first, second = config.inhibit_rules
    assert first.target_matchers == (Matcher(name="severity", op="=", value="warning"),)
    assert first.equal == ("tenant", "service")
    assert second.source_matchers == (Matcher(name="alertname", op="=", value="EventLogDown"),)
    assert second.target_matchers == (Matcher(name="alertname", op="=~", value="View.*"),)
    assert config.derive_inhibitions is False


def test_nothing_configured_gives_the_defaults() -> None:
    """No HUB_ALERTS_FILE and no infrastructure file: the six default rules, the receiver
    ``default`` (log and NATS) and DEFAULT_ROUTE."""
    config, source = load_alerting({}, None)
    assert (config, source) == (default_alerting(), DEFAULTS_SOURCE)
    assert [(r.name, r.source, r.severity, r.for_s, r.threshold) for r in config.rules] == [
        ("HubComponentDown", "infra_unhealthy", "critical", 0.0, None),
        ("ServiceUnhealthy", "service_unhealthy", "critical", 30.0, None),
        ("InstanceExpired", "instance_expired", "warning", 0.0, None),
        ("ViewLagging", "projection_lag_s", "warning", 60.0, 30.0),
        ("EventLogDown", "event_log_down", "critical", 0.0, None),
        ("SelfPreservation", "self_preservation", "warning", 0.0, None),
    ]
    assert config.rules[0].annotations["summary"] == "{component} is unhealthy"
    assert config.route == DEFAULT_ROUTE
    assert [t for t, _ in config.receivers[0].targets()] == ["default/log/0", "default/nats/1"]
    assert config.derive_inhibitions and not config.inhibit_rules


def test_default_rules_pass_the_files_own_checks() -> None:
    """The default rules written as a file parse back to themselves: their templates
    only use placeholders their sources fill, gauges have thresholds."""
    rules = [
        {"alert": r.name, "source": r.source, "severity": r.severity, "for": r.for_s,
         "annotations": r.annotations, **({"threshold": r.threshold} if r.threshold else {})}
        for r in DEFAULT_RULES
    ]  # fmt: skip
    assert parse_alerting({"rules": rules}, "defaults.yaml").rules == DEFAULT_RULES


def test_missing_sections_keep_the_defaults() -> None:
    """A file without ``rules`` keeps the default rules, without ``receivers`` the default
    receiver, without ``route`` DEFAULT_ROUTE; ``rules: []`` means no rules."""
    only_route = parse_alerting({"route": {"receiver": "default", "group_wait": "1m"}}, "a.yaml")
    assert only_route.rules == DEFAULT_RULES and only_route.receivers == DEFAULT_RECEIVERS
    assert only_route.route.group_wait_s == 60.0
    assert only_route.route.repeat_interval_s == DEFAULT_ROUTE.repeat_interval_s
    only_rules = parse_alerting({"rules": []}, "a.yaml")
    assert only_rules.rules == () and only_rules.route == DEFAULT_ROUTE
    assert parse_alerting({}, "a.yaml") == default_alerting()


def test_enabled_false_means_no_rules() -> None:
    """``enabled: false`` leaves no rule (nothing fires); the rules are still checked."""
    assert parse_alerting({"enabled": False}, "a.yaml").rules == ()
    with pytest.raises(AlertConfigError, match="unknown source"):
        parse_alerting({"enabled": False, "rules": [{"alert": "A", "source": "x"}]}, "a.yaml")


def test_seed_channels_are_the_default_receiver() -> None:
    """The seed's ``channels`` list is the receiver ``default`` with those integrations;
    ``console`` is a log line, so [log, console, nats] gives one log and one nats."""
    config = parse_alerting({"channels": ["log", "console", "nats"]}, "a.yaml")
    assert config.receivers == DEFAULT_RECEIVERS
    config = parse_alerting({"channels": ["console"]}, "a.yaml")
    assert config.receivers == (Receiver(name="default", integrations=(Integration(type="log"),)),)


INFRA = """
databases: []
alerts:
  enabled: true
  channels: [log]
  rules:
    - {alert: OnlyOne, source: service_degraded}
"""


def test_alerts_file_wins_over_the_infra_section(tmp_path: Path) -> None:
    """With HUB_ALERTS_FILE set, the infrastructure file's ``alerts:`` is not used."""
    infra = write(tmp_path, INFRA, "infrastructure.yaml")
    alerts = write(tmp_path, "rules: [{alert: Mine, source: instance_flapping}]\n")
    config, source = load_alerting({ALERTS_FILE_ENV: str(alerts)}, infra)
    assert [r.name for r in config.rules] == ["Mine"] and source == str(alerts)
    assert config.receivers == DEFAULT_RECEIVERS


def test_infra_section_is_used_and_its_errors_name_it(tmp_path: Path) -> None:
    """Without HUB_ALERTS_FILE the infrastructure file's ``alerts:`` section is read (the
    seed example's ``channels`` included); errors give the path under ``alerts``."""
    infra = write(tmp_path, INFRA, "infrastructure.yaml")
    config, source = load_alerting({ALERTS_FILE_ENV: " "}, infra)
    assert [r.name for r in config.rules] == ["OnlyOne"]
    assert source == f"{infra} (alerts section)"
    assert config.receivers[0].integrations == (Integration(type="log"),)
    write(tmp_path, INFRA.replace("service_degraded", "service_down"), "infrastructure.yaml")
    with pytest.raises(AlertConfigError) as failure:
        load_alerting({}, infra)
    assert str(failure.value).startswith(
        f'{infra}: alerts.rules[0] (alert "OnlyOne"): source: unknown source'
    )
    assert failure.value.path == "alerts.rules[0].source"
    assert failure.value.rule == "OnlyOne"


def test_infra_file_without_alerts_gives_the_defaults(tmp_path: Path) -> None:
    """An infrastructure file with no (or an empty) ``alerts:`` leaves the defaults."""
    for text in ("databases: []\n", "databases: []\nalerts:\n", ""):
        infra = write(tmp_path, text, "infrastructure.yaml")
        assert load_alerting({}, infra) == (default_alerting(), DEFAULTS_SOURCE)


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("5m", 300), ("4h", 14400), ("1d", 86400), ("1w", 604800),
     ("1h30m", 5400), ("1m30s500ms", 90.5), ("0", 0), ("0s", 0), (45, 45), (0.25, 0.25),
     ("12", 12), ("1.5", 1.5)],
)  # fmt: skip
def test_durations_as_prometheus_writes_them(written: object, seconds: float) -> None:
    """``for`` takes a Prometheus duration or a number of seconds."""
    rule = {"alert": "A", "source": "service_degraded", "for": written}
    assert parse_alerting({"rules": [rule]}, "a.yaml").rules[0].for_s == seconds


@pytest.mark.parametrize(
    ("written", "matcher"),
    [
        ('service="a b"', ("service", "=", "a b")),
        ("service=api", ("service", "=", "api")),
        ('  service != "x" ', ("service", "!=", "x")),
        ('service=~"api-.*|web"', ("service", "=~", "api-.*|web")),
        ("service!~api.+", ("service", "!~", "api.+")),
        ('service=~"a\\d+"', ("service", "=~", "a\\d+")),
        ('service="say \\"hi\\" \\\\ ok"', ("service", "=", 'say "hi" \\ ok')),
        ("service=", ("service", "=", "")),
        ({"name": "service", "value": "api"}, ("service", "=", "api")),
        ({"name": "service", "op": "=~", "value": "a.*"}, ("service", "=~", "a.*")),
    ],
)
def test_matcher_spellings(written: object, matcher: tuple[str, str, str]) -> None:
    """Alertmanager's matcher strings (quotes optional for simple values, escapes inside
    quotes) and the mapping form give the same Matcher."""
    rule = {"alert": "A", "source": "service_degraded", "matchers": [written]}
    (parsed,) = parse_alerting({"rules": [rule]}, "a.yaml").rules[0].matchers
    assert (parsed.name, parsed.op, parsed.value) == matcher


# --- mistakes -------------------------------------------------------------------------------

R = "rules:\n  - {alert: Ok, source: service_degraded}\n  - "  # the mistake is in rules[1]
LAG = 'rules[1] (alert "Lag")'
X = 'rules[1] (alert "X")'
WEBHOOK = "receivers: [{name: default, webhook_configs: [{url: 'http://h/x', "
MISTAKES: list[tuple[str, str, str]] = [
    # the top level
    ("rulez: []\n", "rulez", "unknown key (expected one of: channels, derive_inhibitions"),
    ("enabled: yes please\n", "enabled", "expected true or false, got a string"),
    ("rules: {alert: X}\n", "rules", "expected a list, got a mapping"),
    ("rules:\n", "rules", "is empty (null): write rules: [] for none"),
    ("channels: [log]\nreceivers: []\n", "channels", "either channels (the older form) or"),
    ("channels: [log, slack]\n", "channels[1]", "unknown channel 'slack' (expected one of"),
    # rules
    (R + "{source: service_degraded}\n", "rules[1]: alert", "missing key"),
    (R + "{alert: '', source: service_degraded}\n", "rules[1]: alert", "expected a name"),
    (R + "{alert: Ok, source: service_degraded}\n", 'rules[1] (alert "Ok"): alert',
     "duplicate alert name 'Ok' (first at rules[0])"),
    (R + "just a string\n", "rules[1]", "expected a mapping, got a string"),
    (R + "{alert: X, source: service_degraded, expr: up == 0}\n", f"{X}: expr",
     "unknown key (expected one of: alert, annotations, for, labels, matchers, severity"),
    (R + "{alert: X}\n", f"{X}: source", "missing key"),
    (R + "{alert: X, source: kafka_down}\n", f"{X}: source",
     "unknown source 'kafka_down' (expected one of: infra_unhealthy, service_degraded"),
    (R + "{alert: X, source: [infra_unhealthy]}\n", f"{X}: source", "expected a string, got a"),
    (R + "{alert: X, source: service_degraded, severity: page}\n", f"{X}: severity",
     "unknown severity 'page' (expected one of: critical, warning, info)"),
    (R + "{alert: X, source: service_degraded, labels: {severity: high}}\n",
     f"{X}: labels.severity", "unknown severity 'high'"),
    (R + "{alert: X, source: service_degraded, severity: info, labels: {severity: warning}}\n",
     f"{X}: labels.severity", "contradicts severity"),
    (R + "{alert: X, source: service_degraded, for: 1m1h}\n", f"{X}: for",
     "expected a duration such as 500ms"),
    (R + "{alert: X, source: service_degraded, for: -5}\n", f"{X}: for", "must not be negative"),
    (R + "{alert: X, source: service_degraded, for: [5s]}\n", f"{X}: for",
     "expected a duration such as 30s or a number of seconds, got a list"),
    (R + "{alert: Lag, source: projection_lag_s}\n", f"{LAG}: threshold",
     "the source projection_lag_s needs a threshold"),
    (R + "{alert: Lag, source: projection_lag_s, threshold: high}\n", f"{LAG}: threshold",
     "expected a number, got a string"),
    (R + "{alert: Lag, source: projection_lag_s, threshold: -1}\n", f"{LAG}: threshold",
     "at least 0"),
    (R + "{alert: X, source: service_degraded, threshold: 3}\n", f"{X}: threshold",
     "the source service_degraded is a condition, not a measurement: it takes no threshold"),
    (R + "{alert: X, source: service_degraded, matchers: ['service=~\"(\"']}\n",
     f"{X}: matchers[0]", "invalid regex '('"),
    (R + "{alert: X, source: service_degraded, matchers: ['service==\"a\"']}\n",
     f"{X}: matchers[0]", "quote the value of matcher"),
    (R + "{alert: X, source: service_degraded, matchers: ['service ~ a']}\n",
     f"{X}: matchers[0]", 'expected a matcher name="value"'),
    (R + "{alert: X, source: service_degraded, matchers: ['service=a b']}\n",
     f"{X}: matchers[0]", "quote the value"),
    (R + "{alert: X, source: service_degraded, matchers: [{name: service, op: '~', value: a}]}\n",
     f"{X}: matchers[0]", "unknown operator '~'"),
    (R + "{alert: X, source: service_degraded, matchers: [7]}\n", f"{X}: matchers[0]",
     "expected a matcher string"),
    (R + "{alert: X, source: service_degraded, matchers: ['component=kafka']}\n",
     f"{X}: matchers[0]", "the source service_degraded has no label 'component' (its labels:"),
    (R + "{alert: X, source: service_degraded, annotations: {summary: '{component} down'}}\n",
     f"{X}: annotations.summary", "placeholder {component} cannot be filled"),
    (R + "{alert: X, source: instance_expired, labels: {who: '{owner}'}}\n",
     f"{X}: labels.who", "placeholder {owner} cannot be filled"),
    (R + "{alert: X, source: service_degraded, labels: {service: x}}\n",
     f"{X}: labels.service", "the label 'service' is set by the hub"),
    (R + "{alert: X, source: service_degraded, labels: {2team: x}}\n",
     f"{X}: labels.2team", "expected a label name"),
    (R + "{alert: X, source: service_degraded, annotations: {summary: [a]}}\n",
     f"{X}: annotations.summary", "expected a string, got a list"),
    # the route tree
    ("route: {receiver: pager}\n", "route.receiver",
     "unknown receiver 'pager' (receivers: default)"),
    ("route: {receiver: default, routes: [{receiver: x}]}\n", "route.routes[0].receiver",
     "unknown receiver 'x'"),
    ("route: {group_wait: 1s}\n", "route.receiver", "missing key"),
    ("route: {receiver: default, matchers: ['a=b']}\n", "route.matchers", "takes no matchers"),
    ("route: {receiver: default, group_interval: 0}\n", "route.group_interval",
     "must be longer than 0"),
    ("route: {receiver: default, routes: [{repeat_interval: 0s}]}\n",
     "route.routes[0].repeat_interval", "must be longer than 0"),
    ("route: {receiver: default, group_wait: -1s}\n", "route.group_wait", "expected a duration"),
    ("route: {receiver: default, group_by: [alertname, '...']}\n", "route.group_by[1]",
     "must be the only entry"),
    ("route: {receiver: default, routes: [{match_re: {service: '[a'}}]}\n",
     "route.routes[0].match_re.service", "invalid regex '[a'"),
    ("route: {receiver: default, continue: true}\n", "route.continue", "takes no continue"),
    ("route: {receiver: default, routes: [{recevier: default}]}\n", "route.routes[0].recevier",
     "unknown key"),
    # receivers
    ("receivers: [{name: pager, log_configs: [{}]}]\n", "route", "no route given, and the "
     "default route sends to receiver 'default', which receivers does not define"),
    ("receivers: [{name: default}]\n", "receivers[0]", "receiver 'default' has no integrations"),
    ("receivers: [{name: default, log_configs: [{}]}, {name: default, log_configs: [{}]}]\n",
     "receivers[1].name", "duplicate receiver name 'default' (first at receivers[0])"),
    ("receivers: [{log_configs: [{}]}]\n", "receivers[0].name", "missing key"),
    ("receivers: [{name: a/b, log_configs: [{}]}]\n", "receivers[0].name", "expected a name"),
    ("receivers: []\n", "receivers", "no receivers"),
    ("receivers: [{name: default, webhook_configs: [{}]}]\n",
     "receivers[0].webhook_configs[0].url", "missing key"),
    ("receivers: [{name: default, webhook_configs: [{url: 'ftp://h/x'}]}]\n",
     "receivers[0].webhook_configs[0].url", "expected an http:// or https:// URL"),
    ("receivers: [{name: default, webhook_configs: [{url: 'http:///x'}]}]\n",
     "receivers[0].webhook_configs[0].url", "URL without a host"),
    ("receivers: [{name: default, email_configs: [{to: a@b}]}]\n", "receivers[0].email_configs",
     "email notifications are not supported yet"),
    ("receivers: [{name: default, slack_configs: [{}]}]\n", "receivers[0].slack_configs",
     "unknown key (expected one of: email_configs, log_configs, name, nats_configs, webhook"),
    ("receivers: [{name: default, log_configs: [{url: 'http://h/'}]}]\n",
     "receivers[0].log_configs[0].url", "unknown key"),
    (WEBHOOK + "timeout: 0}]}]\n", "receivers[0].webhook_configs[0].timeout", "longer than 0"),
    (WEBHOOK + "max_attempts: 0}]}]\n", "receivers[0].webhook_configs[0].max_attempts",
     "expected a whole number from 1 to"),
    (WEBHOOK + "backoff: 10s, max_backoff: 5s}]}]\n",
     "receivers[0].webhook_configs[0].max_backoff", "5 s is shorter than backoff (10 s)"),
    (WEBHOOK + "rate_limit: {per_second: 0}}]}]\n",
     "receivers[0].webhook_configs[0].rate_limit.per_second", "must be above 0"),
    (WEBHOOK + "rate_limit: {burst: 3}}]}]\n",
     "receivers[0].webhook_configs[0].rate_limit.per_second", "missing key"),
    (WEBHOOK + "headers: {'Bad Header': x}}]}]\n",
     "receivers[0].webhook_configs[0].headers.Bad Header", "expected an HTTP header name"),
    (WEBHOOK + "send_resolved: sometimes}]}]\n",
     "receivers[0].webhook_configs[0].send_resolved", "expected true or false"),
    # inhibit rules
    ("inhibit_rules: [{target_matchers: ['severity=warning']}]\n", "inhibit_rules[0]",
     "no source matchers"),
    ("inhibit_rules: [{source_match: {severity: critical}}]\n", "inhibit_rules[0]",
     "no target matchers"),
    ("inhibit_rules: [{source_matchers: [a=b], target_matchers: [c=d], equal: [1x]}]\n",
     "inhibit_rules[0].equal[0]", "expected a label name"),
    ("inhibit_rules: [{source_matchers: [a=b], target_matchers: [c=d], equals: [x]}]\n",
     "inhibit_rules[0].equals", "unknown key"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "where", "reason"), MISTAKES, ids=[w for _, w, _ in MISTAKES])
def test_mistake_names_the_file_the_rule_and_the_key(
    tmp_path: Path, text: str, where: str, reason: str
) -> None:
    """Each mistake is an AlertConfigError ``<file>: <rule and key path>: <reason>``; in a
    rule, the rule is named by its index and alert name."""
    path = write(tmp_path, text)
    with pytest.raises(AlertConfigError) as failure:
        from_file(path)
    message = str(failure.value)
    assert message.startswith(f"{path}: {where}: "), message
    assert reason in message, message
    assert failure.value.rule == (where.split('"')[1] if '"' in where else "")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("rules:\n  - alert: X\n   source: y\n", "invalid YAML at line 3"),
        ("route: {receiver: default\n", "invalid YAML at line 2"),
        ("rules: []\nrules: []\n", "invalid YAML at line 2, column 1: duplicate key 'rules'"),
        ("- alert: X\n", "expected a mapping, got a list"),
        ("just text\n", "expected a mapping, got a string"),
        ("", "the file is empty"),
    ],
)
def test_unusable_file_names_the_file_and_line(tmp_path: Path, text: str, reason: str) -> None:
    """A file that is not YAML, or whose top level is not a mapping, fails naming it."""
    path = write(tmp_path, text)
    with pytest.raises(AlertConfigError, match=reason) as failure:
        from_file(path)
    assert str(failure.value).startswith(f"{path}: ")


def test_unreadable_files(tmp_path: Path) -> None:
    """A missing alerts file or infrastructure file is an error naming it (not the
    defaults: a file was asked for)."""
    with pytest.raises(AlertConfigError, match=r"missing\.yaml: cannot read"):
        from_file(tmp_path / "missing.yaml")
    with pytest.raises(AlertConfigError, match=r"infra\.yaml: cannot read"):
        load_alerting({}, tmp_path / "infra.yaml")


def test_describe_alerting() -> None:
    """One line for the log: rules, receivers with their integrations, routes."""
    assert describe_alerting(default_alerting()) == (
        "6 rules; receivers default (log, nats); 1 route"
    )
    config = parse_alerting(yaml.safe_load(FULL), "a.yaml")
    assert describe_alerting(config) == (
        "2 rules; receivers default (log, nats), pager (webhook); 3 routes; "
        "2 inhibit rules; no derived inhibitions"
    )
    assert describe_alerting(parse_alerting({"enabled": False}, "a.yaml")).startswith(
        "no rules (alerting off); "
    )


# --- properties -------------------------------------------------------------------------------

KEYS = [
    "enabled", "channels", "derive_inhibitions", "rules", "route", "receivers",
    "inhibit_rules", "alert", "source", "for", "severity", "threshold", "matchers", "labels",
    "annotations", "receiver", "group_by", "group_wait", "group_interval", "repeat_interval",
    "routes", "match", "match_re", "continue", "name", "log_configs", "nats_configs",
    "webhook_configs", "email_configs", "url", "timeout", "headers", "rate_limit",
    "per_second", "burst", "max_attempts", "backoff", "max_backoff", "source_matchers",
    "target_matchers", "source_match", "target_match_re", "equal", "op", "value", "summary",
]  # fmt: skip
scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(max_size=12)
    | st.sampled_from([*SOURCES, *GAUGES, "critical", "default", "log", "nats", "...", "30s",
                       "1h30m", 'a=~"("', "a=b", "{component}", "http://h/", "a{99999999999}"])
)  # fmt: skip
junk = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5) | st.integers(), inner,
                          max_size=5)
    ),
    max_leaves=40,
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.one_of(junk, st.fixed_dictionaries({}, optional=dict.fromkeys(KEYS[:7], junk))))
def test_junk_data_fails_only_with_alert_config_error(data: Any) -> None:
    """Any shape of data a YAML file can hold either parses or fails with an
    AlertConfigError naming the file; nothing else escapes (no KeyError, TypeError...)."""
    try:
        config = parse_alerting(data, "junk.yaml")
    except AlertConfigError as exc:
        assert str(exc).startswith("junk.yaml")
    else:
        assert config.route.receiver in {r.name for r in config.receivers}
