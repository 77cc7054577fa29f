"""The status vocabularies: their wire spelling, and members that travel as plain strings."""

from __future__ import annotations

from typing import get_args

import msgspec
import pytest
from redis.connection import Encoder

from events.codec import decode_event, encode_event
from events.model import InstanceHealthChanged
from events.vocab import REPORTABLE, Condition, Health, HealthStatus, InfraStatus
from events.wire import HeartbeatMessage, WireError, parse_ingress
from projections.canonical import to_json
from projections.redis_render import counted


def test_the_wire_spelling_of_each_vocabulary():
    """What services, views and tools read: instance health lowercase, the rest uppercase."""
    assert [h.value for h in Health] == [
        "healthy", "degraded", "unhealthy", "critical", "deregistered", "expired",
    ]  # fmt: skip
    assert [s.value for s in InfraStatus] == ["HEALTHY", "UNHEALTHY", "UNKNOWN"]
    assert [c.value for c in Condition] == ["HEALTHY", "DEGRADED", "UNHEALTHY", "UNKNOWN"]


def test_an_instance_reports_only_part_of_the_health_vocabulary():
    """A heartbeat's ``status`` is a Health, but never one the hub decides itself."""
    assert set(get_args(HealthStatus)) == {h.value for h in REPORTABLE}
    assert {Health.HEALTHY, Health.DEGRADED, Health.UNHEALTHY} == REPORTABLE
    assert HeartbeatMessage(service_name="s", instance_id="i").status == Health.HEALTHY


@pytest.mark.parametrize("status", list(Health), ids=str)
def test_a_heartbeat_is_refused_a_health_only_the_hub_decides(status):
    """critical, deregistered and expired are the hub's decisions, not a report."""
    payload = msgspec.json.encode({"service_name": "s", "instance_id": "i", "status": status})
    if status in REPORTABLE:
        msg = parse_ingress("heartbeat", payload, max_metadata_bytes=1024)
        assert isinstance(msg, HeartbeatMessage) and msg.status == status
    else:
        with pytest.raises(WireError) as err:
            parse_ingress("heartbeat", payload, max_metadata_bytes=1024)
        assert err.value.code == "INVALID_FIELD"
        assert err.value.reason == f"Invalid enum value '{status}' - at `$.status`"


def test_members_are_encoded_as_the_plain_strings():
    """An event holding members encodes byte for byte as one holding the strings, and
    the views' renderings and the Redis client see the strings."""
    fields = {"event_id": "e", "tenant": "t", "ts": 1.0, "service_name": "s",
              "instance_id": "i", "reason": "r"}  # fmt: skip
    member = InstanceHealthChanged(**fields, previous=Health.HEALTHY, status=Health.CRITICAL)
    plain = InstanceHealthChanged(**fields, previous="healthy", status="critical")
    assert encode_event(member) == encode_event(plain)
    assert msgspec.msgpack.encode(member) == msgspec.msgpack.encode(plain)
    assert type(decode_event(encode_event(member)).status) is str
    assert to_json({Condition.HEALTHY: [InfraStatus.UNKNOWN]}) == '{"HEALTHY":["UNKNOWN"]}'
    assert counted(Health.HEALTHY, False) == ["status:healthy", "trusted"]
    assert Encoder("utf-8", "strict", False).encode(Health.CRITICAL) == b"critical"
