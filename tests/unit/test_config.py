"""Configuration comes from the environment; bad values fail at start, naming the variable."""

from __future__ import annotations

import pytest

from hub.config import ConfigError, HubConfig


def test_seed_variables_configure_the_hub():
    """The seed's variable names set the servers; NATS_URL and KAFKA_BROKERS are lists."""
    c = HubConfig.from_env({
        "NATS_URL": "nats://a:4222,nats://b:4222", "POSTGRES_HOST": "pg", "POSTGRES_PORT": "5433",
        "DRAGONFLY_HOST": "df", "KAFKA_BROKERS": "k1:9092,k2:9092", "HUB_EVENT_LOG": "kafka",
        "HUB_TENANTS": "acme, default",
    })  # fmt: skip
    assert c.nats_urls == ("nats://a:4222", "nats://b:4222")
    assert (c.postgres_host, c.postgres_port, c.redis_host) == ("pg", 5433, "df")
    assert c.kafka_brokers == ("k1:9092", "k2:9092")
    assert c.tenants == {"acme", "default"}
    assert HubConfig.from_env(c.to_env()) == c


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"POSTGRES_PORT": "fivefour"}, "POSTGRES_PORT"),
        ({"DRAGONFLY_PORT": "70000"}, "DRAGONFLY_PORT"),
        ({"HUB_EVENT_LOG": "rabbitmq"}, "HUB_EVENT_LOG"),
        ({"HUB_TENANTS": "ok,Not Valid"}, "HUB_TENANTS"),
        ({"HUB_LOG_FORMAT": "xml"}, "HUB_LOG_FORMAT"),
    ],
)
def test_bad_values_fail_naming_the_variable(env, named):
    """Each malformed variable is a ConfigError whose message names it."""
    with pytest.raises(ConfigError, match=named):
        HubConfig.from_env(env)


def test_query_servers_and_timeout_come_from_the_environment():
    """HUB_QUERY_SERVERS (1 by default; 0: none started, they run elsewhere) and
    HUB_QUERY_TIMEOUT_S (2 s by default) are read; a negative count or a zero timeout is
    refused, naming the variable."""
    assert (HubConfig().query_servers, HubConfig().query_timeout_s) == (1, 2.0)
    c = HubConfig.from_env({"HUB_QUERY_SERVERS": "0", "HUB_QUERY_TIMEOUT_S": "0.5"})
    assert (c.query_servers, c.query_timeout_s) == (0, 0.5)
    assert HubConfig.from_env(c.to_env()) == c
    with pytest.raises(ConfigError, match="HUB_QUERY_SERVERS"):
        HubConfig.from_env({"HUB_QUERY_SERVERS": "-1"})
    with pytest.raises(ConfigError, match="HUB_QUERY_TIMEOUT_S"):
        HubConfig.from_env({"HUB_QUERY_TIMEOUT_S": "0"})
