"""What the infrastructure monitor watches: the seed's ``infrastructure.yaml`` as typed structs.

The file lists components in three sections (``databases``, ``messaging``, ``search``),
each a list of components or a mapping ``name -> component``, plus
``service_dependencies`` (which services need which components) and ``alerts``.
Reading it is strict: a typo in a key or a method would otherwise turn into a check
that silently does something else, so every problem is an :class:`InfraConfigError`
naming the file, the key path (``messaging[2].health_check.method``) and the reason.

``default_components`` describes the hub's own servers without any file, so the hub
monitors its own stack out of the box.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import msgspec

from hub.config import HubConfig
from hub.infra._reader import InfraConfigError, Node, describe, load_yaml

__all__ = [
    "DEFAULT_INTERVAL_S",
    "DEFAULT_TIMEOUT_S",
    "HUB_INTERVAL_S",
    "HUB_TIMEOUT_S",
    "METHODS",
    "SECTIONS",
    "AlertsConfig",
    "Component",
    "HealthCheck",
    "InfraConfig",
    "InfraConfigError",
    "Method",
    "ServiceDependency",
    "default_components",
    "load_infra_config",
    "parse_infra_config",
]

Method = Literal["tcp", "http", "redis_ping", "kafka_admin", "postgres", "nats"]

METHODS: tuple[Method, ...] = get_args(Method)
SECTIONS: tuple[str, ...] = ("databases", "messaging", "search")
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_INTERVAL_S = 30.0
# The hub's own stack is checked more often, each check under a timeout below the interval:
# a frozen store (a SIGSTOPped Redis) is UNHEALTHY after HUB_INFRA_FAILURES (2) checks, so
# within about two intervals.
HUB_INTERVAL_S = 5.0
HUB_TIMEOUT_S = 2.0

_TOP_KEYS = (*SECTIONS, "service_dependencies", "alerts")
_COMPONENT_KEYS = (
    "name", "host", "port", "type", "health_check", "dependencies", "critical",
    "description", "management_port",
)  # fmt: skip
_HEALTH_KEYS = (
    "method", "endpoint", "port", "command", "timeout", "interval", "expect_status",
    "expect_body", "user", "database", "password_env",
)  # fmt: skip
# Optional health-check keys that mean something to some methods only: given to another
# method they would be ignored, which is a misunderstanding worth reporting.
_METHOD_ONLY: dict[str, tuple[str, ...]] = {
    "endpoint": ("http", "nats"),
    "expect_status": ("http", "nats"),
    "expect_body": ("http", "nats"),
    "user": ("postgres",),
    "database": ("postgres",),
    "password_env": ("postgres", "redis_ping"),
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class HealthCheck(msgspec.Struct, frozen=True, kw_only=True):
    """How to probe a component; ``timeout`` and ``interval`` are seconds.

    ``port`` overrides the component's port for the probe (e.g. ClickHouse's HTTP port,
    NATS's monitoring port). ``command`` is kept from the seed's files but runs nothing.
    Passwords are never part of the configuration: ``password_env`` names the
    environment variable that holds one.
    """

    method: Method
    endpoint: str = ""
    port: int | None = None
    command: str = ""
    timeout: float = DEFAULT_TIMEOUT_S
    interval: float = DEFAULT_INTERVAL_S
    expect_status: tuple[int, ...] = ()  # empty: any 2xx or 3xx
    expect_body: str = ""
    user: str = ""
    database: str = ""
    password_env: str = ""


class Component(msgspec.Struct, frozen=True, kw_only=True):
    """One piece of infrastructure, in the section (``databases``, ...) it was listed in."""

    name: str
    host: str
    port: int
    health_check: HealthCheck
    section: str
    type: str = ""
    dependencies: tuple[str, ...] = ()
    critical: bool = False
    description: str = ""
    management_port: int | None = None

    @property
    def check_port(self) -> int:
        """The port the probe talks to."""
        return self.health_check.port or self.port

    @property
    def health_url(self) -> str | None:
        """The URL an HTTP probe (``http``, or NATS monitoring) fetches; None otherwise."""
        check = self.health_check
        if check.endpoint.startswith(("http://", "https://")):
            return check.endpoint
        if check.method == "http":
            port = self.check_port
        elif check.method == "nats" and check.endpoint:
            port = check.port or self.management_port or self.port
        else:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}{check.endpoint or '/'}"


class ServiceDependency(msgspec.Struct, frozen=True, kw_only=True):
    """A service of the fleet and the components it cannot work without."""

    name: str
    requires: tuple[str, ...]


class AlertsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Whether alerts about unhealthy components are raised, and the channels they go to."""

    enabled: bool = True
    channels: tuple[str, ...] = ()


class InfraConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Every monitored component, who depends on them, and where alerts go."""

    components: tuple[Component, ...]
    service_dependencies: tuple[ServiceDependency, ...] = ()
    alerts: AlertsConfig = AlertsConfig()
    source: str = ""

    def component(self, name: str) -> Component:
        """The component called ``name`` (KeyError if there is none)."""
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(name)

    def dependents(self, component: str) -> list[str]:
        """The services (from ``service_dependencies``) that require ``component``, sorted."""
        return sorted(s.name for s in self.service_dependencies if component in s.requires)

    def to_data(self) -> dict[str, Any]:
        """The configuration in the file's shape (list form); parsing it gives it back."""
        data: dict[str, Any] = {section: [] for section in SECTIONS}
        for component in self.components:
            data[component.section].append(_component_data(component))
        data["service_dependencies"] = {
            s.name: {"requires": list(s.requires)} for s in self.service_dependencies
        }
        data["alerts"] = {"enabled": self.alerts.enabled, "channels": list(self.alerts.channels)}
        return data


# --- loading --------------------------------------------------------------------------------


def load_infra_config(path: str | os.PathLike[str]) -> InfraConfig:
    """Read and check the infrastructure file at ``path`` (environment from ``os.environ``)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InfraConfigError(source, "", "cannot read: not UTF-8 text") from None
    except OSError as exc:
        raise InfraConfigError(source, "", f"cannot read: {exc.strerror or exc}") from None
    return parse_infra_config(text, source)


def parse_infra_config(
    text: str, source: str = "<string>", env: Mapping[str, str] | None = None
) -> InfraConfig:
    """Parse the infrastructure YAML ``text``; ``source`` names it in error messages.

    ``${VAR}`` and ``${VAR:-default}`` in hosts, ports, endpoints and PostgreSQL user and
    database names are looked up in ``env`` (``os.environ`` when None).
    """
    root = Node(load_yaml(text, source), "", source, os.environ if env is None else env)
    if root.missing:
        root.fail("the file is empty (expected a mapping with databases, messaging, search)")
    root.mapping(_TOP_KEYS)
    components = _read_all_components(root)
    known = {component.name for component, _ in components}
    for component, dependencies in components:
        _check_references(dependencies, known, itself=component.name)
    return InfraConfig(
        components=tuple(component for component, _ in components),
        service_dependencies=_read_services(root.child("service_dependencies"), known),
        alerts=_read_alerts(root.child("alerts")),
        source=source,
    )


def _read_all_components(root: Node) -> list[tuple[Component, Node]]:
    """Every component of every section, with the node of its ``dependencies``."""
    found: list[tuple[Component, Node]] = []
    first_seen: dict[str, str] = {}
    for section in SECTIONS:
        for name_node, node in _section_entries(root.child(section)):
            component = _read_component(node, section, name_node)
            if component.name in first_seen:
                name_node.fail(
                    f"duplicate component name {component.name!r} "
                    f"(first at {first_seen[component.name]})"
                )
            first_seen[component.name] = node.path
            found.append((component, node.child("dependencies")))
    return found


def _section_entries(section: Node) -> list[tuple[Node, Node]]:
    """(node holding the name, component node) for the list or the mapping form."""
    if isinstance(section.value, dict):
        entries = []
        for key, node in section.entries():
            named = node.child("name")
            if not named.missing and named.value != key:
                named.fail(f"differs from the component's key {key!r}")
            entries.append((Node(key, node.path, node.source, node.env), node))
        return entries
    if not section.missing and not isinstance(section.value, list):
        section.fail(f"expected a list or a mapping of components, got {describe(section.value)}")
    entries = []
    for node in section.items():
        node.mapping(_COMPONENT_KEYS)  # before asking for its name
        entries.append((node.required("name"), node))
    return entries


def _read_component(node: Node, section: str, name_node: Node) -> Component:
    node.mapping(_COMPONENT_KEYS)
    host = node.required("host").interpolated().strip()
    if not host:
        node.child("host").fail("must not be empty")
    management_port = node.child("management_port").optional_port()
    return Component(
        name=name_node.name(),
        host=host,
        port=node.required("port").port(),
        health_check=_read_health_check(node.required("health_check"), management_port),
        section=section,
        type=node.child("type").string(),
        dependencies=node.child("dependencies").names(),
        critical=node.child("critical").boolean(False),
        description=node.child("description").string(),
        management_port=management_port,
    )


def _read_health_check(node: Node, management_port: int | None) -> HealthCheck:
    raw = node.mapping(_HEALTH_KEYS)
    method_node = node.required("method")
    method = method_node.string()
    if method not in METHODS:
        method_node.fail(f"unknown method {method!r} (expected one of: {', '.join(METHODS)})")
    for key, methods in _METHOD_ONLY.items():
        if raw.get(key) is not None and method not in methods:
            node.child(key).fail(f"only used by method {' or '.join(methods)}, not {method!r}")
    timeout = node.child("timeout").seconds(DEFAULT_TIMEOUT_S)
    interval = node.child("interval").seconds(DEFAULT_INTERVAL_S)
    if timeout > interval:
        node.child("timeout").fail(f"{timeout:g} s exceeds the interval ({interval:g} s)")
    port = node.child("port").optional_port()
    return HealthCheck(
        method=method,  # narrowed to Method by the membership test above
        endpoint=_read_endpoint(node, method, port or management_port),
        port=port,
        command=node.child("command").string(),
        timeout=timeout,
        interval=interval,
        expect_status=_read_statuses(node.child("expect_status")),
        expect_body=node.child("expect_body").string(),
        user=node.child("user").interpolated(),
        database=node.child("database").interpolated(),
        password_env=_read_env_name(node.child("password_env")),
    )


def _read_endpoint(check: Node, method: str, monitor_port: int | None) -> str:
    """A path or an http(s) URL; HTTP checks default to ``/``."""
    node = check.child("endpoint")
    endpoint = node.interpolated().strip()
    if method == "http" and not endpoint:
        return "/"
    if endpoint and not endpoint.startswith(("/", "http://", "https://")):
        node.fail(f"expected a path starting with '/' or an http(s):// URL, got {endpoint!r}")
    if method == "nats" and endpoint.startswith("/") and monitor_port is None:
        node.fail("a NATS monitoring endpoint needs health_check.port or management_port")
    if endpoint.startswith(("http://", "https://")) and not urlsplit(endpoint).hostname:
        node.fail(f"URL without a host: {endpoint!r}")
    return endpoint


def _read_statuses(node: Node) -> tuple[int, ...]:
    """``expect_status``: one HTTP status or a list of them."""
    items = node.items() if isinstance(node.value, list) else [node] if not node.missing else []
    statuses = []
    for item in items:
        status = item.value
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            item.fail(f"expected an HTTP status 100..599, got {status!r}")
        statuses.append(status)
    return tuple(statuses)


def _read_env_name(node: Node) -> str:
    name = node.string()
    if name and not _ENV_NAME.fullmatch(name):
        node.fail(f"expected an environment variable name, got {name!r}")
    return name


def _check_references(node: Node, known: set[str], *, itself: str | None = None) -> None:
    for item in node.items():
        name = item.name()
        if name == itself:
            item.fail(f"component {name!r} cannot depend on itself")
        if name not in known:
            item.fail(f"unknown component {name!r}")


def _read_services(node: Node, known: set[str]) -> tuple[ServiceDependency, ...]:
    if node.missing:
        return ()
    services = []
    for name, service in node.entries():
        service.mapping(("requires",))
        requires = service.required("requires")
        _check_references(requires, known)
        services.append(ServiceDependency(name=name, requires=requires.names()))
    return tuple(sorted(services, key=lambda s: s.name))  # the file's order means nothing


def _read_alerts(node: Node) -> AlertsConfig:
    if node.missing:
        return AlertsConfig()
    # The rest of the section (rules, route, receivers, ...) is read by hub.alerts.rules.
    node.mapping(("enabled", "channels", "derive_inhibitions", "rules", "route", "receivers",
                  "inhibit_rules"))  # fmt: skip
    return AlertsConfig(
        enabled=node.child("enabled").boolean(True),
        channels=node.child("channels").names(),
    )


def _component_data(component: Component) -> dict[str, Any]:
    """One component in the file's shape, leaving out what is unset."""
    # JSON-shaped (tuples become lists) so that yaml.safe_dump can write it.
    data: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(component))
    del data["section"]  # the section is where the component is listed
    check = data["health_check"].items()
    data["health_check"] = {k: v for k, v in check if v not in (None, "", [])}
    return {k: v for k, v in data.items() if v is not None}


# --- the hub's own stack ------------------------------------------------------------------

_HUB_SOURCE = "<hub defaults>"


def default_components(config: HubConfig) -> InfraConfig:
    """The hub's own servers as components, so that it watches its stack without a file.

    NATS (one component per URL), PostgreSQL, the Redis-protocol server, and the Kafka
    brokers only when Kafka is the event log. Passwords stay out: the checks read them from
    the environment variables the hub reads them from (``POSTGRES_PASSWORD``,
    ``DRAGONFLY_PASSWORD``), or the caller passes them to ``run_check``.
    """
    # In section order (databases, then messaging), the order parsing to_data() gives.
    components = [
        _hub_component(
            "hub-postgres",
            (config.postgres_host, config.postgres_port),
            "databases",
            "postgres",
            HealthCheck(
                method="postgres",
                interval=HUB_INTERVAL_S,
                timeout=HUB_TIMEOUT_S,
                user=config.postgres_user,
                database=config.postgres_db,
                password_env="POSTGRES_PASSWORD",
            ),
        ),
        _hub_component(
            "hub-redis",
            (config.redis_host, config.redis_port),
            "databases",
            "redis",
            HealthCheck(
                method="redis_ping",
                interval=HUB_INTERVAL_S,
                timeout=HUB_TIMEOUT_S,
                password_env="DRAGONFLY_PASSWORD",
            ),
        ),
    ]
    nats = [_host_port(url, 4222, "nats_urls") for url in config.nats_urls]
    nats_check = HealthCheck(method="nats", interval=HUB_INTERVAL_S, timeout=HUB_TIMEOUT_S)
    components += [
        _hub_component(name, address, "messaging", "nats", nats_check)
        for name, address in _numbered("hub-nats", nats)
    ]
    if config.event_log == "kafka":
        brokers = [_host_port(b, 9092, "kafka_brokers") for b in config.kafka_brokers]
        kafka_check = HealthCheck(
            method="kafka_admin", interval=HUB_INTERVAL_S, timeout=HUB_TIMEOUT_S
        )
        components += [
            _hub_component(name, address, "messaging", "kafka", kafka_check)
            for name, address in _numbered("hub-kafka", brokers)
        ]
    return InfraConfig(components=tuple(components), source=_HUB_SOURCE)


def _hub_component(
    name: str, address: tuple[str, int], section: str, kind: str, check: HealthCheck
) -> Component:
    return Component(
        name=name,
        host=address[0],
        port=address[1],
        health_check=check,
        section=section,
        type=kind,
        critical=True,
        description="the hub's own stack",
    )


def _numbered(prefix: str, items: list[tuple[str, int]]) -> list[tuple[str, tuple[str, int]]]:
    """``prefix`` for a single item, ``prefix-1``, ``prefix-2``, ... for several."""
    if len(items) == 1:
        return [(prefix, items[0])]
    return [(f"{prefix}-{i}", item) for i, item in enumerate(items, start=1)]


def _host_port(address: str, default_port: int, setting: str) -> tuple[str, int]:
    """Host and port of ``nats://user:pw@host:4222`` or ``host:9092``; credentials dropped."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port or default_port
    except ValueError:  # the message would repeat the address, credentials included
        raise InfraConfigError(
            _HUB_SOURCE, setting, f"bad port for host {parts.hostname!r}"
        ) from None
    return parts.hostname or "127.0.0.1", port
