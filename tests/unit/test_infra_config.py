"""The infrastructure file: the example loads, ``${VAR}`` references resolve, and every
malformed file fails with an InfraConfigError naming the file, the key path and the reason."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.config import HubConfig
from hub.infra.config import (
    HUB_INTERVAL_S,
    METHODS,
    SECTIONS,
    InfraConfig,
    InfraConfigError,
    default_components,
    load_infra_config,
    parse_infra_config,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "infrastructure.example.yaml"

# --- the example file -----------------------------------------------------------------------


def test_example_file_loads_with_its_defaults() -> None:
    """With no variables set, the example gives the seed's ten components on their default
    ports, in file order, with the dependencies and alerts it declares."""
    config = parse_infra_config(EXAMPLE.read_text(), EXAMPLE.name, env={})
    assert [c.name for c in config.components] == [
        "postgresql", "dragonflydb", "arangodb", "clickhouse",
        "nats-1", "nats-2", "nats-3", "kafka", "zookeeper", "weaviate",
    ]  # fmt: skip
    assert {c.section for c in config.components} == set(SECTIONS)
    assert {c.host for c in config.components} == {"localhost"}
    ports = {c.name: c.port for c in config.components}
    assert ports["postgresql"] == 5432 and ports["nats-3"] == 4224 and ports["kafka"] == 9092
    assert {c.health_check.method for c in config.components} == set(METHODS)

    postgres = config.component("postgresql").health_check
    assert (postgres.user, postgres.database, postgres.password_env) == (
        "postgres", "central_hub", "POSTGRES_PASSWORD",
    )  # fmt: skip
    clickhouse = config.component("clickhouse")
    assert clickhouse.health_url == "http://localhost:8123/ping"
    assert (clickhouse.health_check.expect_status, clickhouse.health_check.expect_body) == (
        (200,), "Ok.",
    )  # fmt: skip
    assert config.component("nats-2").health_url == "http://localhost:8223/healthz"
    assert config.component("kafka").dependencies == ("zookeeper",)
    assert config.dependents("kafka") == ["analytics-service", "data-bridge"]
    assert config.dependents("zookeeper") == []
    assert config.alerts.enabled and config.alerts.channels == ("log", "nats")


def test_example_file_loads_from_disk() -> None:
    """load_infra_config reads the file itself (with this process's environment)."""
    config = load_infra_config(EXAMPLE)
    assert len(config.components) == 10
    assert config.source == str(EXAMPLE)


# --- environment variables ------------------------------------------------------------------


def test_environment_overrides_hosts_and_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables set in the environment replace the defaults of ``${VAR:-default}``;
    a variable set but empty falls back to the default, as in the shell."""
    monkeypatch.setenv("POSTGRES_HOST", "db.internal")
    monkeypatch.setenv("POSTGRES_PORT", "6543")
    monkeypatch.setenv("NATS_1_MONITOR_PORT", "9222")
    monkeypatch.setenv("KAFKA_HOST", "")
    config = load_infra_config(EXAMPLE)
    postgres = config.component("postgresql")
    assert (postgres.host, postgres.port) == ("db.internal", 6543)
    assert config.component("nats-1").health_url == "http://localhost:9222/healthz"
    assert config.component("kafka").host == "localhost"


def test_references_inside_longer_values() -> None:
    """Several references and literal text mix in one value (here a full URL)."""
    text = component_yaml(
        "search", "name: w\nhost: ${W_HOST}\nport: 1\n"
        "health_check: {method: http, endpoint: 'http://${W_HOST}:${W_PORT:-81}/ready'}",
    )  # fmt: skip
    config = parse_infra_config(text, "x.yaml", env={"W_HOST": "weaviate.svc"})
    assert config.component("w").health_url == "http://weaviate.svc:81/ready"


def test_unset_variable_names_the_key_and_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``${VAR}`` without a default and VAR unset fails, naming file, key and variable."""
    monkeypatch.delenv("INFRA_TEST_NOT_SET", raising=False)
    path = tmp_path / "unset.yaml"
    path.write_text(component_yaml("databases", VALID_DB.replace("5432", "${INFRA_TEST_NOT_SET}")))
    with pytest.raises(InfraConfigError) as failure:
        load_infra_config(path)
    message = str(failure.value)
    assert message.startswith(f"{path}: databases[0].port: ")
    assert "INFRA_TEST_NOT_SET is not set" in message


# --- malformed files ------------------------------------------------------------------------

VALID_DB = "name: pg\nhost: localhost\nport: 5432\nhealth_check: {method: postgres}"


def component_yaml(section: str, body: str) -> str:
    """A file with one component (``body``: its keys, one per line) in ``section``."""
    first, *rest = body.splitlines()
    return "\n".join([f"{section}:", f"  - {first}", *(f"    {line}" for line in rest)]) + "\n"


def base() -> dict[str, Any]:
    """A valid file: one database, three messaging components, one service."""

    def component(name: str, port: int, method: str, **extra: Any) -> dict[str, Any]:
        check = {"method": method, "timeout": 2, "interval": 10}
        return {"name": name, "host": "localhost", "port": port, "health_check": check, **extra}

    return {
        "databases": [component("postgresql", 5432, "postgres")],
        "messaging": [
            component("nats-1", 4222, "nats"),
            component("zookeeper", 2181, "tcp"),
            component("kafka", 9092, "kafka_admin", dependencies=["zookeeper"]),
        ],
        "service_dependencies": {"data-bridge": {"requires": ["nats-1", "kafka"]}},
        "alerts": {"enabled": True, "channels": ["log"]},
    }


def test_base_is_valid() -> None:
    """The file the malformed cases start from is itself fine (so each case fails for its
    own reason)."""
    config = parse_infra_config(yaml.safe_dump(base()), "base.yaml", env={})
    assert config.dependents("kafka") == ["data-bridge"]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to the base file: ``value`` at ``path`` (``a.b[1].c``); ``...`` deletes."""

    def change(data: dict[str, Any]) -> None:
        keys: list[Any] = []
        for part in path.split("."):
            name, _, index = part.partition("[")
            keys.append(name)
            if index:
                keys.append(int(index.rstrip("]")))
        target: Any = data
        for key in keys[:-1]:
            target = target[key]
        if value is ...:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value

    return change


MALFORMED = [
    ("messaging[1].host", ..., "missing key"),
    ("messaging[2].health_check.method", ..., "missing key"),
    ("databases[0].health_check", ..., "missing key"),
    ("messaging[0].port", [4222], "expected a port number, got a list"),
    ("messaging[0].critical", "yes", "expected true or false, got a string"),
    ("messaging[2].dependencies", "zookeeper", "expected a list, got a string"),
    ("databases[0].host", 10, "expected a string, got an integer"),
    ("databases[0].health_check.timeout", "fast", "expected a number of seconds"),
    ("databases[0].health_check.interval", 0, "must be a positive number of seconds"),
    ("databases[0].health_check.timeout", 11, "11 s exceeds the interval (10 s)"),
    ("messaging[2].health_check.method", "ping", "unknown method 'ping'"),
    ("messaging[0].port", "abc", "expected a port number, got 'abc'"),
    ("messaging[0].port", 0, "port 0 out of range 1..65535"),
    ("messaging[0].port", 70000, "port 70000 out of range 1..65535"),
    ("messaging[0].port", True, "expected a port number, got a boolean"),
    ("databases[0].health_check.port", 65536, "port 65536 out of range"),
    ("messaging[0].management_port", -1, "port -1 out of range"),
    ("messaging[1].name", "postgresql", "duplicate component name 'postgresql' (first at"),
    ("messaging[2].dependencies", ["zookeeper", "redis"], "unknown component 'redis'"),
    ("messaging[2].dependencies", ["kafka"], "cannot depend on itself"),
    ("service_dependencies.data-bridge.requires", ["nats-1", "ghost"], "unknown component"),
    ("service_dependencies.data-bridge.requires", ..., "missing key"),
    ("messaging[0].health_check.timout", 1, "unknown key"),
    ("messaging[0].healthcheck", {}, "unknown key"),
    ("search", "weaviate", "expected a list or a mapping of components, got a string"),
    ("messaging[1].health_check.endpoint", "/x", "only used by method http or nats, not 'tcp'"),
    ("messaging[0].health_check.endpoint", "/healthz", "needs health_check.port or management"),
    ("databases[0].health_check.password_env", "not a name", "expected an environment var"),
    ("alerts.enabled", "on", "expected true or false"),
]


@pytest.mark.parametrize(
    ("path", "value", "reason"), MALFORMED, ids=[f"{p}={v!r}" for p, v, _ in MALFORMED]
)
def test_malformed_file_names_file_path_and_reason(
    tmp_path: Path, path: str, value: Any, reason: str
) -> None:
    """Each defect is an InfraConfigError whose message is ``<file>: <key path>: <reason>``
    with the exact path of the offending key (list index included)."""
    data = copy.deepcopy(base())
    _set(path, value)(data)
    file = tmp_path / "broken-infra.yaml"
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(InfraConfigError) as failure:
        load_infra_config(file)
    expected_path = path
    if path == "service_dependencies.data-bridge.requires" and value is not ...:
        expected_path += "[1]"
    if path == "messaging[2].dependencies" and isinstance(value, list):
        expected_path += f"[{len(value) - 1}]"
    assert str(failure.value).startswith(f"{file}: {expected_path}: "), str(failure.value)
    assert reason in str(failure.value)
    assert failure.value.path == expected_path


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("databases:\n  - name: pg\n   host: x\n", "invalid YAML at line 3"),
        ("databases: []\nmessaging: [\n", "invalid YAML at line 3"),
        ("databases: []\ndatabases: []\n", "invalid YAML at line 2, column 1: duplicate key"),
        ("", "the file is empty"),
        ("- just\n- a list\n", "expected a mapping, got a list"),
        ("\tdatabases: []\n", "invalid YAML at line 1"),
    ],
)
def test_unusable_yaml_names_the_file_and_line(tmp_path: Path, text: str, reason: str) -> None:
    """YAML that does not parse (or is not a mapping) fails naming file and line."""
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    with pytest.raises(InfraConfigError, match=reason) as failure:
        load_infra_config(file)
    assert str(failure.value).startswith(f"{file}: ")


def test_unreadable_file(tmp_path: Path) -> None:
    """A missing file or one that is not UTF-8 is an InfraConfigError naming it."""
    with pytest.raises(InfraConfigError, match=r"missing\.yaml: cannot read"):
        load_infra_config(tmp_path / "missing.yaml")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("databases: []\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(InfraConfigError, match=r"latin\.yaml: cannot read: not UTF-8"):
        load_infra_config(latin)


def test_mapping_form_takes_names_from_keys() -> None:
    """A section may map names to components; errors then use the name in the path."""
    text = "databases:\n  pg:\n    host: h\n    port: 5432\n    health_check: {method: tcp}\n"
    config = parse_infra_config(text, "m.yaml", env={})
    assert config.component("pg").port == 5432
    with pytest.raises(InfraConfigError, match=r"^m\.yaml: databases\.pg\.port: port 0 out"):
        parse_infra_config(text.replace("5432", "0"), "m.yaml", env={})
    with pytest.raises(InfraConfigError, match=r"databases\.pg\.name: differs"):
        parse_infra_config(text.replace("    host", "    name: other\n    host"), "m.yaml")


def test_expected_status_and_http_defaults() -> None:
    """``expect_status`` takes one status or a list; an http check without endpoint GETs /;
    an IPv6 host is bracketed in the URL."""
    text = component_yaml(
        "search",
        "name: s\nhost: '::1'\nport: 8080\nhealth_check: {method: http, expect_status: 204}",
    )
    component = parse_infra_config(text, "s.yaml", env={}).component("s")
    assert component.health_check.expect_status == (204,)
    assert component.health_url == "http://[::1]:8080/"
    listed = parse_infra_config(text.replace("204", "[200, 503]"), "s.yaml", env={})
    assert listed.component("s").health_check.expect_status == (200, 503)
    with pytest.raises(InfraConfigError, match=r"expect_status\[1\]: expected an HTTP status"):
        parse_infra_config(text.replace("204", "[200, 999]"), "s.yaml", env={})


# --- the hub's own stack ------------------------------------------------------------------


def test_default_components_follow_the_event_log() -> None:
    """Without a file the hub watches its PostgreSQL, Redis and NATS servers, and Kafka only
    when Kafka is its event log; all critical, every 5 s, each check timing out before the
    next is due (so a frozen server is UNHEALTHY within about two intervals)."""
    jetstream = default_components(HubConfig())
    assert [c.name for c in jetstream.components] == ["hub-postgres", "hub-redis", "hub-nats"]
    kafka = default_components(
        HubConfig(
            event_log="kafka",
            nats_urls=("nats://a:4222", "nats://b:4223"),
            kafka_brokers=("k1:9092", "k2"),
        )
    )
    assert [(c.name, c.host, c.port, c.health_check.method) for c in kafka.components[2:]] == [
        ("hub-nats-1", "a", 4222, "nats"),
        ("hub-nats-2", "b", 4223, "nats"),
        ("hub-kafka-1", "k1", 9092, "kafka_admin"),
        ("hub-kafka-2", "k2", 9092, "kafka_admin"),
    ]
    assert HUB_INTERVAL_S == 5
    assert all(c.critical and c.health_check.interval == HUB_INTERVAL_S for c in kafka.components)
    assert all(c.health_check.timeout < HUB_INTERVAL_S for c in kafka.components)


def test_default_components_keep_no_secret() -> None:
    """The PostgreSQL password and credentials in a NATS URL appear nowhere in the
    components: they name the variable to read the password from instead."""
    hub = HubConfig(
        postgres_password="pg-Secret-1", redis_password="rd-Secret-2",
        nats_urls=("nats://user:nats-Secret-3@n1:4222",), postgres_db="hubdb", postgres_user="hub",
    )  # fmt: skip
    config = default_components(hub)
    encoded = msgspec.json.encode(config).decode() + repr(config.to_data())
    for secret in ("pg-Secret-1", "rd-Secret-2", "nats-Secret-3"):
        assert secret not in encoded
    postgres = config.component("hub-postgres").health_check
    assert (postgres.user, postgres.database, postgres.password_env) == (
        "hub", "hubdb", "POSTGRES_PASSWORD",
    )  # fmt: skip
    assert config.component("hub-nats").host == "n1"


# --- properties -------------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True)
ports = st.integers(1, 65535)


@st.composite
def valid_files(draw: st.DrawFn) -> dict[str, Any]:
    """A random valid file: components with unique names, dependencies on earlier ones."""
    component_names = draw(st.lists(names, min_size=1, max_size=8, unique=True))
    data: dict[str, Any] = {section: [] for section in SECTIONS}
    for i, name in enumerate(component_names):
        method = draw(st.sampled_from(METHODS))
        interval = draw(st.floats(0.01, 3600, allow_nan=False))
        check: dict[str, Any] = {
            "method": method,
            "interval": interval,
            "timeout": draw(st.floats(0.001, 1.0)) * interval,
        }
        if method == "http":
            check["endpoint"] = draw(st.from_regex(r"/[a-z0-9/._-]{0,20}", fullmatch=True))
            check["expect_status"] = draw(st.lists(st.integers(100, 599), max_size=3))
        if method == "postgres":
            check["user"] = draw(names)
        component = {
            "name": name,
            "host": draw(st.from_regex(r"[a-z0-9.-]{1,30}", fullmatch=True)),
            "port": draw(ports),
            "health_check": check,
            "critical": draw(st.booleans()),
            "dependencies": draw(st.lists(st.sampled_from(component_names[:i]), unique=True))
            if i
            else [],
            "management_port": draw(st.none() | ports),
        }
        data[draw(st.sampled_from(SECTIONS))].append(component)
    services = draw(st.dictionaries(names, st.lists(st.sampled_from(component_names)), max_size=4))
    data["service_dependencies"] = {s: {"requires": r} for s, r in services.items()}
    return data


@settings(max_examples=150, deadline=None)
@given(valid_files())
def test_valid_files_parse_to_what_they_say_and_round_trip(data: dict[str, Any]) -> None:
    """Every valid file parses to components carrying exactly its values, and writing the
    result back (to_data) and parsing again gives the same configuration."""
    config = parse_infra_config(yaml.safe_dump(data), "random.yaml", env={})
    listed = [(s, c) for s in SECTIONS for c in data[s]]
    assert [c.name for c in config.components] == [c["name"] for _, c in listed]
    for component, (section, raw) in zip(config.components, listed, strict=True):
        assert component.section == section
        assert (component.host, component.port) == (raw["host"], raw["port"])
        assert component.health_check.method == raw["health_check"]["method"]
        assert component.health_check.timeout == pytest.approx(raw["health_check"]["timeout"])
        assert component.dependencies == tuple(raw["dependencies"])
        assert component.management_port == raw["management_port"]
    for name, service in data["service_dependencies"].items():
        assert {name} <= {s.name for s in config.service_dependencies}
        for required in service["requires"]:
            assert name in config.dependents(required)
    again = parse_infra_config(yaml.safe_dump(config.to_data()), "random.yaml", env={})
    assert again == config


KEYS = [
    *SECTIONS, "service_dependencies", "alerts", "name", "host", "port", "health_check",
    "method", "timeout", "interval", "dependencies", "requires", "endpoint", "expect_status",
    "management_port", "critical", "channels", "enabled", "user", "password_env",
]  # fmt: skip
scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(max_size=12) | st.sampled_from([*METHODS, "${X}", "${X:-1}", "${", "nats-1"])
)  # fmt: skip
junk = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(KEYS) | st.text(max_size=5) | st.integers(), inner, max_size=5
        )
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(junk, st.fixed_dictionaries({}, optional=dict.fromkeys(SECTIONS, junk))))
def test_junk_data_fails_only_with_infra_config_error(data: Any) -> None:
    """Any shape of data a YAML file can hold either parses or fails with
    InfraConfigError; nothing else escapes (no KeyError, TypeError, ...)."""
    try:
        text = yaml.safe_dump(data)
    except (yaml.YAMLError, ValueError):
        return
    try:
        config = parse_infra_config(text, "junk.yaml", env={"X": "7"})
    except InfraConfigError as exc:
        assert str(exc).startswith("junk.yaml")
    else:
        assert isinstance(config, InfraConfig)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_junk_text_fails_only_with_infra_config_error(text: str) -> None:
    """Arbitrary text (broken YAML included) fails only with InfraConfigError."""
    try:
        parse_infra_config(text, "text.yaml", env={})
    except InfraConfigError as exc:
        assert str(exc).startswith("text.yaml")
