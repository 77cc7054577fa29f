"""compose/ cannot run here (no Docker engine); check what can be checked statically."""

from __future__ import annotations

from pathlib import Path

import yaml

from hub.config import ENV_VARS, HubConfig

COMPOSE = Path(__file__).resolve().parents[2] / "compose" / "docker-compose.yml"


def load() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_parses_and_has_the_production_stack():
    """The file is valid YAML with a NATS cluster of three, Kafka, PostgreSQL, Dragonfly
    and the hub."""
    services = load()["services"]
    assert {"nats-1", "nats-2", "nats-3", "suho-kafka", "suho-postgresql",
            "suho-dragonflydb", "central-hub"} <= set(services)  # fmt: skip
    for n in ("nats-1", "nats-2", "nats-3"):
        assert "-js" in services[n]["command"]
        assert "--cluster" in services[n]["command"]
    assert services["suho-kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_hub_service_sets_every_variable_the_hub_reads():
    """Every environment variable in hub.config.ENV_VARS is set for the hub, and the
    values (after substituting placeholders) make a valid configuration using Kafka."""
    env = load()["services"]["central-hub"]["environment"]
    missing = sorted(set(ENV_VARS) - set(env))
    assert not missing, f"compose does not set {missing}"
    unknown = sorted(set(env) - set(ENV_VARS))
    assert not unknown, f"compose sets variables the hub does not read: {unknown}"
    resolved = {k: ("secret" if str(v).startswith("${") else str(v)) for k, v in env.items()}
    config = HubConfig.from_env(resolved)
    assert config.event_log == "kafka"
    assert len(config.nats_urls) == 3
    assert config.kafka_brokers == ("suho-kafka:9092",)
    assert config.query_servers >= 1  # the hub starts query servers: queries are answered


def test_hub_points_at_services_defined_in_the_file():
    """The hosts the hub is told to use are services of the same file."""
    doc = load()
    env = doc["services"]["central-hub"]["environment"]
    hosts = {env["POSTGRES_HOST"], env["DRAGONFLY_HOST"], env["KAFKA_BROKERS"].split(":")[0]}
    hosts |= {u.split("//")[1].split(":")[0] for u in env["NATS_URL"].split(",")}
    assert hosts <= set(doc["services"])


def test_every_service_has_a_restart_policy():
    """Every service is long-running: each one (also through the NATS anchor) is restarted
    when it exits (unless-stopped, always or on-failure), never left down ('no')."""
    services = load()["services"]
    policies = {name: service.get("restart") for name, service in services.items()}
    missing = sorted(name for name, policy in policies.items() if policy is None)
    assert not missing, f"services without a restart policy: {missing}"
    allowed = {"unless-stopped", "always", "on-failure"}
    wrong = {n: p for n, p in policies.items() if str(p).split(":")[0] not in allowed}
    assert not wrong, f"restart policies that leave a service down: {wrong}"
