"""The codec round-trips every event, and the wire contract parses what it promises."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.codec import decode_event, encode_event
from events.model import (
    EVENT_TYPES,
    FlappingEnded,
    FlappingStarted,
    HeartbeatReceived,
    InfraChecked,
    InfraConfigLoaded,
    InfraStatusChanged,
    InputRejected,
    InstanceExpired,
    InstanceHealthChanged,
    SelfPreservationEnded,
    SelfPreservationStarted,
    ServiceDeregistered,
    ServiceRegistered,
)
from events.names import is_name
from events.translate import derive_instance_id
from events.wire import WireError, parse_ingress
from tests.strategies import ALERT_STRATEGIES

names = st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,20}\Z")
finite = st.floats(allow_nan=False, allow_infinity=False)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), finite, st.text())
envelope = {
    "event_id": st.text(min_size=1, max_size=40),
    "tenant": names,
    "ts": finite,
    "ingress_seq": st.integers(0, 2**63 - 1),
}
EVENT_STRATEGIES = {
    ServiceRegistered: st.builds(
        ServiceRegistered, **envelope, service_name=names, instance_id=names,
              host=st.text(min_size=1), port=st.integers(1, 65535), protocol=st.text(),
              version=st.text(), health_endpoint=st.text(),
              metadata=st.dictionaries(st.text(), json_scalars, max_size=5),
              transport_preferences=st.lists(st.sampled_from(["nats", "kafka", "http"])),
              heartbeat_interval_s=finite, depends_on=st.lists(names, max_size=4),
              ttl_s=finite, expire_after_s=finite),
    ServiceDeregistered: st.builds(
        ServiceDeregistered, **envelope, service_name=names, instance_id=names,
              reason=st.text()),
    HeartbeatReceived: st.builds(
        HeartbeatReceived, **envelope, service_name=names, instance_id=names,
              status=st.sampled_from(["healthy", "degraded", "unhealthy"]),
              load=st.none() | finite,
              checks=st.dictionaries(st.text(), json_scalars, max_size=5), last_seen=finite),
    InputRejected: st.builds(
        InputRejected, **envelope, subject=st.text(), reason_code=st.text(),
              reason=st.text(), excerpt=st.text()),
    InstanceHealthChanged: st.builds(
        InstanceHealthChanged, **envelope, service_name=names, instance_id=names,
              previous=st.text(), status=st.text(), reason=st.text(), last_seen=finite),
    InstanceExpired: st.builds(
        InstanceExpired, **envelope, service_name=names, instance_id=names,
              last_seen=finite, critical_since=finite, reason=st.text()),
    FlappingStarted: st.builds(
        FlappingStarted, **envelope, service_name=names, instance_id=names,
              changes=st.integers(0, 100), window_s=finite, status=st.text()),
    FlappingEnded: st.builds(
        FlappingEnded, **envelope, service_name=names, instance_id=names,
              previous=st.text(), status=st.text(), quiet_s=finite),
    SelfPreservationStarted: st.builds(
        SelfPreservationStarted, **envelope, critical=st.integers(0, 10**6),
              live=st.integers(0, 10**6), share=finite, until=finite,
              at_risk=st.lists(st.text(), max_size=5)),
    SelfPreservationEnded: st.builds(
        SelfPreservationEnded, **envelope, reason=st.text(), critical=st.integers(0, 10**6),
              live=st.integers(0, 10**6)),
    InfraChecked: st.builds(
        InfraChecked, **envelope, component=names, status=st.text(), response_time_ms=finite,
              error=st.text(), metadata=st.dictionaries(st.text(), json_scalars, max_size=3),
              consecutive_failures=st.integers(0, 1000)),
    InfraStatusChanged: st.builds(
        InfraStatusChanged, **envelope, component=names, previous=st.text(), status=st.text(),
              reason=st.text(), consecutive_failures=st.integers(0, 1000)),
    InfraConfigLoaded: st.builds(
        InfraConfigLoaded, **envelope, source=st.text(), digest=st.text(),
              components=st.lists(st.dictionaries(st.text(), json_scalars, max_size=3),
                                  max_size=3),
              service_dependencies=st.dictionaries(names, st.lists(names, max_size=3),
                                                   max_size=3)),
    **ALERT_STRATEGIES,
}  # fmt: skip
events = st.one_of(*EVENT_STRATEGIES.values())


@given(events)
def test_every_event_round_trips_through_the_codec(event):
    """decode(encode(e)) == e for every event type, and the tag names the type."""
    data = encode_event(event)
    assert decode_event(data) == event
    assert msgspec.json.decode(data)["type"] == type(event).__name__


def test_the_strategy_covers_every_event_type():
    """The round-trip property is not vacuous: it has a strategy for each event type."""
    assert set(EVENT_STRATEGIES) == set(EVENT_TYPES)


def test_decoder_refuses_an_unknown_type_tag():
    """An event with an unknown type tag is a decode error, not a silent default."""
    with pytest.raises(msgspec.ValidationError):
        decode_event(b'{"type": "Nope", "event_id": "x", "tenant": "t", "ts": 1}')


@pytest.mark.parametrize(
    ("payload", "code", "where"),
    [
        (b"{not json", "MALFORMED_JSON", ""),
        (b"", "MALFORMED_JSON", ""),
        (b"\xff\xfe", "MALFORMED_UTF8", "byte 0"),
        (b'{"service_name": "orders", "host": "h", "port": "80"}', "INVALID_FIELD", "$.port"),
        (b'{"service_name": "orders", "host": "h"}', "INVALID_FIELD", "port"),
        (b'{"service_name": "orders", "host": "h", "port": 70000}', "INVALID_FIELD", "$.port"),
        (b'{"service_name": "x; DROP TABLE", "host": "h", "port": 1}', "INVALID_FIELD",
         "$.service_name"),
        (b'{"service_name": "a:b", "host": "h", "port": 1}', "INVALID_FIELD", "$.service_name"),
        (b'{"service_name": "ok", "host": "h\\r\\nx", "port": 1}', "INVALID_FIELD", "$.host"),
        (b'{"service_name": "ok", "host": "h", "port": 1, "metadata": {"k": "' + b"v" * 9000
         + b'"}}', "METADATA_TOO_LARGE", "$.metadata"),
        (b'[1, 2]', "INVALID_FIELD", ""),
    ],
)  # fmt: skip
def test_bad_registrations_are_refused_with_a_code_naming_the_field(payload, code, where):
    """Each kind of bad input gets a stable code and a reason that names the field."""
    with pytest.raises(WireError) as info:
        parse_ingress("register", payload, max_metadata_bytes=8192)
    assert info.value.code == code
    assert where in info.value.reason


def test_minimal_registration_gets_defaults():
    """Only service_name, host and port are required; the rest has documented defaults."""
    msg = parse_ingress("register", b'{"service_name":"orders","host":"10.0.0.5","port":8080}',
                        max_metadata_bytes=8192)  # fmt: skip
    assert (msg.protocol, msg.health_endpoint, msg.heartbeat_interval_s) == (
        "http",
        "/health",
        10.0,
    )


@given(names, st.text(min_size=1, max_size=60), st.integers(1, 65535))
def test_derived_instance_id_is_deterministic_and_valid(service, host, port):
    """A registration without instance_id gets the same valid id every time."""
    a = derive_instance_id(service, host, port)
    assert a == derive_instance_id(service, host, port)
    assert is_name(a)
