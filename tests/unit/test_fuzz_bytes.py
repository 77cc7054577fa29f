"""Fuzzing the bytes of the hub's inputs, not only their JSON (no servers).

The strategies of ``tests/fuzzing.py`` start from valid messages and break their raw
bytes (invalid UTF-8, overlong forms, surrogates, truncation, deep nesting, huge
numbers, NUL and control characters, duplicate keys, byte order marks); the subjects
are broken too, and seen as ``hub.natsconn.HubClient`` delivers them. Whatever comes
in, the contract answers with a documented code, ``classify`` never raises, and what
the hub records is exactly what it decided.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from events.codec import decode_event, encode_event
from events.model import Event, HeartbeatReceived, InputRejected, ServiceRegistered
from events.translate import classify
from events.wire import (
    MAX_DEPTH,
    AlertsQuery,
    HealthQuery,
    InfrastructureQuery,
    IngressMessage,
    InstancesQuery,
    ServiceQuery,
    ServicesQuery,
    WireError,
    check_depth,
    parse_ingress,
    parse_query,
)
from hub.config import HubConfig
from projections.alert_read import alert_filter
from tests.fuzzing import (
    NAMED_INGRESS,
    NAMED_QUERIES,
    NAMED_SUBJECTS,
    POISON,
    as_delivered,
    ingress_messages,
    ingress_subjects,
    query_messages,
)

# The reason codes the README documents for ingress messages, and for queries.
INGRESS_CODES = {"MALFORMED_UTF8", "MALFORMED_JSON", "INVALID_FIELD", "METADATA_TOO_LARGE"}
QUERY_CODES = {"MALFORMED_UTF8", "MALFORMED_JSON", "INVALID_REQUEST"}
# What classify may answer besides those: the subject's codes (a mutated kind is no
# ingress subject at all).
SUBJECT_CODES = {"INVALID_TENANT", "UNKNOWN_TENANT", "UNKNOWN_SUBJECT"}

QUERY_TYPES: dict[str, type[Any]] = {
    "services": ServicesQuery,
    "service": ServiceQuery,
    "instances": InstancesQuery,
    "health": HealthQuery,
    "infrastructure": InfrastructureQuery,
    "alerts": AlertsQuery,
}
MAX_METADATA = 8 * 1024
CONFIG = HubConfig(tenants=frozenset({"default", "acme"}))
OPEN_CONFIG = HubConfig()  # any valid tenant name
OK = b'{"service_name":"orders","instance_id":"orders-1","host":"10.0.0.5","port":8080}'

# A modest budget: each property runs in a few seconds; the named cases always run.
# FUZZ_EXAMPLES=20000 (say) for a long run.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "250")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def with_examples(cases: Any) -> Callable[[Any], Any]:
    """An ``@example`` per case (a tuple of the test's arguments)."""

    def decorate(test: Any) -> Any:
        for case in reversed(list(cases)):
            test = example(*case)(test)
        return test

    return decorate


def texts(value: Any) -> Iterator[str]:
    """Every string (keys included) in a JSON-like value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from texts(k)
            yield from texts(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from texts(v)


def is_pg_text(text: str) -> bool:
    """Storable as PostgreSQL text (and jsonb): no NUL, and encodable as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def integers(value: Any) -> Iterator[int]:
    """Every integer (not bool) in a JSON-like value."""
    if isinstance(value, int) and not isinstance(value, bool):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from integers(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from integers(v)


def storable(value: Any) -> bool:
    """What every view and the hub's pipe to them (MessagePack) can hold: PostgreSQL
    text, integers of 64 bits."""
    plain = msgspec.to_builtins(value)
    return all(is_pg_text(t) for t in texts(plain)) and all(
        -(2**63) <= i < 2**63 for i in integers(plain)
    )


def is_printable(text: str) -> bool:
    """PostgreSQL text without control characters (a reason is read by people, sent
    as a header and logged)."""
    return is_pg_text(text) and not any(c < " " or c == "\x7f" for c in text)


def parse(kind: str, payload: bytes) -> IngressMessage | WireError:
    try:
        return parse_ingress(kind, payload, max_metadata_bytes=MAX_METADATA)
    except WireError as exc:
        return exc


@FUZZ
@given(ingress_messages())
@with_examples([((kind, payload),) for kind, payload in NAMED_INGRESS])
def test_parse_ingress_returns_a_message_or_a_documented_wire_error(
    message: tuple[str, bytes],
) -> None:
    """``parse_ingress`` on any bytes returns a message or raises ``WireError`` with one
    of the documented ingress codes, nothing else; a message it returns carries only
    valid text (UTF-8 encodable, no NUL in the free-form fields) and 64-bit integers."""
    kind, payload = message
    result = parse(kind, payload)
    if isinstance(result, WireError):
        assert result.code in INGRESS_CODES, result
        assert result.reason and is_printable(result.reason), result
    else:
        assert storable(result), result


@FUZZ
@given(query_messages())
@with_examples([((view, body),) for view, body in NAMED_QUERIES])
def test_parse_query_returns_a_query_or_a_documented_wire_error(
    message: tuple[str, bytes],
) -> None:
    """``parse_query`` for each query type, on any bytes, returns the query or raises
    ``WireError`` with MALFORMED_UTF8, MALFORMED_JSON or INVALID_REQUEST, nothing else
    (alerts: so does reading what the query asks for, ``alert_filter``)."""
    view, body = message
    try:
        q = parse_query(body, QUERY_TYPES[view])
        if isinstance(q, AlertsQuery):
            alert_filter(q)
    except WireError as exc:
        assert exc.code in QUERY_CODES, exc
        assert exc.reason and is_printable(exc.reason), exc
    else:
        assert isinstance(q, QUERY_TYPES[view])


def check_classified(config: HubConfig, subject: str, payload: bytes) -> Event:
    event = classify(config, subject, payload, seq=7, ts=1_700_000_000.25)
    assert isinstance(event, Event)
    if isinstance(event, InputRejected):
        # INTERNAL_ERROR is the hub's own failure (a bug) on the message: never expected.
        assert event.reason_code in INGRESS_CODES | SUBJECT_CODES, event
    # The log holds exactly what the hub decided: a replay folds the same event.
    again = decode_event(encode_event(event))
    assert type(again) is type(event)
    assert again == event, (event, again)
    # ... and every view can store it.
    assert storable(event), event
    return event


@FUZZ
@given(ingress_subjects(), ingress_messages())
@with_examples(
    [(b"hub." + kind.encode(), (kind, payload)) for kind, payload in NAMED_INGRESS]
    + [(raw, ("register", OK)) for raw in NAMED_SUBJECTS]
)
def test_classify_never_raises_and_records_exactly_its_decision(
    raw_subject: bytes, message: tuple[str, bytes]
) -> None:
    """``classify`` never raises, on mutated payloads and on mutated subjects (bytes
    that are not UTF-8 arrive escaped, as HubClient delivers them); the event it
    returns encodes and decodes back to an equal event, and holds only what every view
    and the hub's pipe to its views can store (PostgreSQL text, 64-bit integers)."""
    _kind, payload = message
    subject = as_delivered(raw_subject)
    check_classified(CONFIG, subject, payload)
    check_classified(OPEN_CONFIG, subject, payload)


def rejection_fields(event: InputRejected) -> list[str]:
    return [event.event_id, event.tenant, event.subject, event.reason_code, event.reason,
            event.excerpt]  # fmt: skip


@FUZZ
@given(
    st.one_of(
        st.tuples(st.just("ingress"), ingress_subjects(), ingress_messages()),
        st.tuples(st.just("query"), st.just(b""), query_messages()),
    )
)
@with_examples(
    [(("ingress", b"hub." + k.encode(), (k, p)),) for k, p in NAMED_INGRESS]
    + [(("ingress", raw, ("register", OK)),) for raw in NAMED_SUBJECTS]
    + [(("query", b"", (v, b)),) for v, b in NAMED_QUERIES]
)
def test_every_reason_and_rejection_field_is_printable_text(
    case: tuple[str, bytes, tuple[str, bytes]],
) -> None:
    """Every ``WireError.reason`` and every field of an ``InputRejected`` is text that
    PostgreSQL stores as is: no NUL, nothing that is not UTF-8. A reason (read by a
    person, stored in ``input_rejections``, sent as a dead letter's header) has no
    control characters at all, even where it quotes the sender's text."""
    what, raw_subject, (kind, payload) = case
    if what == "query":
        try:
            parse_query(payload, QUERY_TYPES[kind])
        except WireError as exc:
            assert is_printable(exc.reason) and is_printable(exc.code), exc
        return
    result = parse(kind, payload)
    if isinstance(result, WireError):
        assert is_printable(result.reason) and is_printable(result.code), result
    event = classify(CONFIG, as_delivered(raw_subject), payload, seq=3, ts=2.5)
    if isinstance(event, InputRejected):
        assert all(is_pg_text(f) for f in rejection_fields(event)), event


# --- named cases, pinned one by one --------------------------------------------------


@pytest.mark.parametrize("payload", POISON)
def test_the_poison_registrations_are_rejected_as_malformed_utf8(payload: bytes) -> None:
    """The registrations that crashed the hub (invalid UTF-8 inside ``service_name``:
    ``\\xff``, an encoded surrogate) are rejected with MALFORMED_UTF8, naming the byte."""
    with pytest.raises(WireError) as info:
        parse_ingress("register", payload, max_metadata_bytes=MAX_METADATA)
    assert info.value.code == "MALFORMED_UTF8"
    assert "at byte 17" in info.value.reason
    event = check_classified(CONFIG, "hub.register", payload)
    assert isinstance(event, InputRejected) and event.reason_code == "MALFORMED_UTF8"


@pytest.mark.parametrize(
    "raw_subject", [b"hub.register.\xff", b"hub.register.\xff\xfe", b"hub.heartbeat.\xed\xa0\x80"]
)
def test_a_subject_that_is_not_utf8_is_an_invalid_tenant(raw_subject: bytes) -> None:
    """A subject with bytes that are not UTF-8 (as HubClient delivers it: escaped) is
    rejected as INVALID_TENANT under the ``_invalid`` tenant, its text escaped."""
    event = check_classified(CONFIG, as_delivered(raw_subject), OK)
    assert isinstance(event, InputRejected)
    assert (event.reason_code, event.tenant) == ("INVALID_TENANT", "_invalid")
    assert "\\x" in event.subject


def nested_checks(depth: int) -> bytes:
    """A heartbeat whose ``checks`` value is ``depth`` arrays deep (document: depth + 2)."""
    return (b'{"service_name":"orders","instance_id":"orders-1","checks":{"x":'
            + b"[" * depth + b"]" * depth + b"}}")  # fmt: skip


def at_stack_depth(frames: int, call: Callable[[], Any]) -> Any:
    """``call()`` with about ``frames`` more Python frames below it."""
    if frames <= 0:
        try:
            return call()
        except (WireError, RecursionError) as exc:
            return exc
    return at_stack_depth(frames - 1, call)


@pytest.mark.parametrize("depth", [62, 63, 100, 900, 990, 5000])
def test_nesting_is_bounded_and_decided_the_same_at_any_stack_depth(depth: int) -> None:
    """Nesting deeper than the contract's limit (64 levels in all) is MALFORMED_JSON,
    decided by the bytes alone: the same answer whatever the caller's stack depth.
    Without it, msgspec's limit is Python's recursion limit counted from the caller's
    stack: checks ~900 deep were accepted at a shallow stack and raised RecursionError
    at a deeper one (decoding, and encoding the event alike), so an event the ingest
    loop accepted could fail to be appended (retried for ever) or to be read back from
    the log (left out of a replay); deeper ones were INTERNAL_ERROR."""
    payload = nested_checks(depth)
    shallow = at_stack_depth(0, lambda: parse_ingress("heartbeat", payload,
                                                      max_metadata_bytes=10**6))  # fmt: skip
    deep = at_stack_depth(700, lambda: parse_ingress("heartbeat", payload,
                                                     max_metadata_bytes=10**6))  # fmt: skip
    assert type(shallow) is type(deep)
    if depth + 2 <= 64:
        assert not isinstance(shallow, Exception), shallow
        event = check_classified(CONFIG, "hub.heartbeat", payload)
        encoded = encode_event(event)
        assert at_stack_depth(700, lambda: decode_event(encoded)) == event
    else:
        assert isinstance(shallow, WireError) and isinstance(deep, WireError)
        assert (shallow.code, shallow.reason) == (deep.code, deep.reason)
        assert shallow.code == "MALFORMED_JSON" and "64" in shallow.reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet='[]{}"\\ab\u00fc\n'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=30,
)  # fmt: skip


def true_depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(true_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(true_depth, value.values()), default=0)
    return 0


@FUZZ
@given(json_values, st.integers(0, 70))
def test_check_depth_counts_the_true_nesting_of_valid_json(value: Any, wrap: int) -> None:
    """``check_depth`` refuses exactly the documents nested deeper than MAX_DEPTH: it
    counts arrays and objects, not the brackets inside strings (escaped quotes too)."""
    for _ in range(wrap):
        value = [value] if wrap % 2 else {"k]": value}
    data = msgspec.json.encode(value)
    try:
        check_depth(data)
    except WireError as exc:
        assert exc.code == "MALFORMED_JSON"
        assert true_depth(value) > MAX_DEPTH
    else:
        assert true_depth(value) <= MAX_DEPTH


NUMERIC_FIELDS = [
    ("register", "port"),
    ("register", "heartbeat_interval_s"),
    ("register", "ttl_s"),
    ("register", "expire_after_s"),
    ("heartbeat", "load"),
]
BASES = {
    "register": b'{"service_name":"orders","host":"10.0.0.5","port":8080',
    "heartbeat": b'{"service_name":"orders","instance_id":"orders-1"',
}


@pytest.mark.parametrize(("kind", "field"), NUMERIC_FIELDS)
@pytest.mark.parametrize("number", [b"1e999999", b"-1e400", b"1" + b"0" * 400])
def test_a_number_out_of_range_is_an_invalid_field_naming_it(
    kind: str, field: str, number: bytes
) -> None:
    """A number no float holds (1e999999, -1e400, 10**400 as digits) in a numeric field
    is INVALID_FIELD naming the field: never ``inf``, which the log would encode as
    ``null`` (the hub's state and a replay of its log would then differ)."""
    payload = BASES[kind] + b',"' + field.encode() + b'":' + number + b"}"
    with pytest.raises(WireError) as info:
        parse_ingress(kind, payload, max_metadata_bytes=MAX_METADATA)
    assert info.value.code == "INVALID_FIELD"
    assert f"`$.{field}`" in info.value.reason


@pytest.mark.parametrize(("kind", "field"), [("register", "metadata"), ("heartbeat", "checks")])
@pytest.mark.parametrize(
    "number",
    [b"1e999999", b"-1e400", b"1" + b"0" * 400, b"-" + b"9" * 400, b"9223372036854775808",
     b"-9223372036854775809", b"18446744073709551615"],
)  # fmt: skip
def test_a_number_out_of_range_in_the_free_form_fields_is_an_invalid_field(
    kind: str, field: str, number: bytes
) -> None:
    """In ``metadata`` and ``checks`` (at any depth) a float out of range and an integer
    beyond 64 bits are INVALID_FIELD naming the field. Such an integer was accepted and
    recorded, then the hub's pipe to its views (MessagePack) raised OverflowError after
    the append: the ingest task died with the batch unacknowledged."""
    for value in (b'{"n":' + number + b"}", b'{"a":{"b":[1,' + number + b"]}}"):
        payload = BASES[kind] + b',"' + field.encode() + b'":' + value + b"}"
        if kind == "register" and b"{" in value[1:]:
            continue  # metadata values are scalars: a plain type error
        with pytest.raises(WireError) as info:
            parse_ingress(kind, payload, max_metadata_bytes=MAX_METADATA)
        assert info.value.code == "INVALID_FIELD"
        assert f"`$.{field}" in info.value.reason


@pytest.mark.parametrize(("kind", "field"), [("register", "metadata"), ("heartbeat", "checks")])
def test_64_bit_integers_in_the_free_form_fields_are_kept_exactly(kind: str, field: str) -> None:
    """The largest integers allowed (64-bit signed) are recorded exactly: the event the
    log holds decodes back to them."""
    value = {"max": 2**63 - 1, "min": -(2**63), "float": 1.7976931348623157e308}
    payload = BASES[kind] + b',"' + field.encode() + b'":' + msgspec.json.encode(value) + b"}"
    event = check_classified(CONFIG, f"hub.{kind}", payload)
    assert isinstance(event, HeartbeatReceived | ServiceRegistered)
    assert (event.checks if isinstance(event, HeartbeatReceived) else event.metadata) == value
