"""Messages that break the bytes, not only the JSON: strategies for the hub's inputs.

Each generator starts from a *valid* message of one kind (``register``,
``heartbeat``, ``deregister``; the queries ``services``, ``service``,
``instances``, ``health``, ``infrastructure``) and mutates its raw bytes: invalid
UTF-8 in keys and in values, overlong encodings, encoded surrogates, escaped lone
surrogates, truncation, byte flips / insertions / deletions, deep nesting (also
inside ``metadata`` and ``checks``), huge exponents and huge integers in every
numeric and in the free-form fields, NUL and control characters, duplicate keys and
byte order marks. Subjects are mutated the same way (a tenant token with bytes that
are not UTF-8, as nats-server accepts them).

The generators draw every choice from a :class:`Source`, so they come in two forms:

* hypothesis strategies (``ingress_messages()``, ``query_messages()``, ...), which
  shrink a failure to a small example;
* a seeded corpus (``ingress_corpus(seed, n)``, ``query_corpus(seed, n)``) for tests
  against real servers: the same seed always gives the same messages.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import msgspec
from hypothesis import strategies as st

T = TypeVar("T")

INGRESS_KINDS = ("register", "heartbeat", "deregister")
QUERY_VIEWS = ("services", "service", "instances", "health", "infrastructure", "alerts")
MAX_BYTES = 60_000  # under the ingress stream's message limit (64 KiB)


class Source(Protocol):
    """Where a generator's choices come from: hypothesis, or a seeded random."""

    def integer(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        ...

    def pick(self, options: Sequence[T]) -> T:
        """One of ``options`` (the first is the simplest: hypothesis shrinks to it)."""
        ...


class Seeded:
    """A :class:`Source` over ``random.Random(seed)``: reproducible, no hypothesis."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self._rng.randint(lo, hi)

    def pick(self, options: Sequence[T]) -> T:
        return options[self._rng.randrange(len(options))]


class Drawn:
    """A :class:`Source` over hypothesis' ``draw`` (inside ``st.composite``)."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self._draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return int(self._draw(st.integers(lo, hi)))

    def pick(self, options: Sequence[T]) -> T:
        return options[self._draw(st.integers(0, len(options) - 1))]


def chance(src: Source, one_in: int) -> bool:
    """True once in ``one_in`` (for hypothesis: shrinks to False)."""
    return src.integer(0, one_in - 1) == one_in - 1


# --- the bad material --------------------------------------------------------------

# Byte sequences that are not UTF-8: stray continuation and never-valid bytes,
# overlong forms (of '/', '\0' and U+FFFF), encoded surrogates (CESU-8 style),
# code points above U+10FFFF, sequences cut short, 5- and 6-byte forms.
BAD_UTF8: tuple[bytes, ...] = (
    b"\xff", b"\xfe", b"\x80", b"\xbf",
    b"\xc0\xaf", b"\xc1\xbf", b"\xc0\x80", b"\xe0\x80\xaf", b"\xe0\x9f\xbf",
    b"\xf0\x80\x80\xaf", b"\xf0\x8f\xbf\xbf",
    b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xed\xa0\x80\xed\xb0\x80", b"\xed\xaf\xbf\xed\xbf\xbf",
    b"\xf4\x90\x80\x80", b"\xf7\xbf\xbf\xbf",
    b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98",
    b"\xf8\x88\x80\x80\x80", b"\xfc\x84\x80\x80\x80\x80",
    b"\xff\xfe", b"\xfe\xff",
)  # fmt: skip

# JSON escapes that decode to no valid text (lone or misordered surrogates), next to
# ones that do (a proper pair, NUL and other control characters, noncharacters).
ESCAPES: tuple[bytes, ...] = (
    rb"\ud800",
    rb"\udfff",
    rb"\udc00",
    rb"\udbff",
    rb"\udc00\ud800",
    rb"\ud800\u0041",
    rb"\ud800x",
    rb"\ud800\ud800",
    rb"\ud83d\ude00",
    rb"\u0000",
    rb"\u0001",
    rb"\u001b",
    rb"\u007f",
    rb"\u0085",
    rb"\u2028",
    rb"\ufeff",
    rb"\uffff",
    rb"\ufffe",
    rb"\u",
    rb"\uZZZZ",
    rb"\x41",
    b"\\",
)

# Numbers no float or 64-bit integer holds, and edge cases of the ones that fit.
HUGE: tuple[bytes, ...] = (
    b"1e999999", b"-1e400", b"1" + b"0" * 400, b"-" + b"9" * 400, b"1e-999999",
    b"0." + b"0" * 400 + b"1", b"1.7976931348623159e308", b"1.7976931348623157e308",
    b"4.9e-324", b"2.5e-324", b"18446744073709551616", b"-9223372036854775809",
    b"9223372036854775808", b"1E+309", b"-0", b"-0.0", b"1e18446744073709551616",
    b"123456789012345678901234567890.5e-7", b"1" * 5000, b"0" * 10 + b"1",
)  # fmt: skip

BOMS: tuple[bytes, ...] = (b"\xef\xbb\xbf", b"\xfe\xff", b"\xff\xfe", b"\x00\x00\xfe\xff")

# Raw control bytes (not allowed unescaped in a JSON string).
CONTROL = tuple(bytes([c]) for c in [*range(0x00, 0x20), 0x7F])

DEPTHS = (2, 10, 31, 32, 33, 63, 64, 65, 100, 500, 990, 1000, 1001, 3000, 10_000, 20_000)


def encoded_surrogate(src: Source) -> bytes:
    """A UTF-16 surrogate (U+D800..U+DFFF) encoded as if it were a character."""
    return chr(src.integer(0xD800, 0xDFFF)).encode("utf-8", "surrogatepass")


def bad_utf8(src: Source) -> bytes:
    return encoded_surrogate(src) if chance(src, 4) else src.pick(BAD_UTF8)


# --- valid messages ----------------------------------------------------------------

SERVICES = ("orders", "payments", "data-bridge.v2", "a", "x" * 63, "svc-9")
HOSTS = ("10.0.0.5", "h", "orders.internal", "fe80::1%eth0", "a" * 253)
METADATA: tuple[dict[str, Any], ...] = (
    {},
    {"region": "eu-1", "weight": 3, "ratio": 0.5, "canary": False, "note": None},
    {"city": "zürich ☃ 🚀", "k" * 128: "v", "n": -7, "big": 2**63 - 1, "tiny": 5e-324},
)
CHECKS: tuple[dict[str, Any], ...] = (
    {},
    {"db": {"ok": True, "latency_ms": 3.2, "tags": ["a", "b"]}, "disk": "ok"},
    {"deps": [{"name": "redis", "up": False, "errors": [1, 2.5, None]}], "ü": "ß"},
)


def name(src: Source) -> str:
    if chance(src, 3):
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789._-"
        return src.pick("abc09") + "".join(src.pick(alphabet) for _ in range(src.integer(0, 20)))
    return src.pick(SERVICES)


def register(src: Source) -> dict[str, Any]:
    msg: dict[str, Any] = {"service_name": name(src), "host": src.pick(HOSTS),
                           "port": src.pick((8080, 1, 65535, 443))}  # fmt: skip
    optional: dict[str, Any] = {
        "instance_id": name(src)[:60] + "-1",
        "protocol": src.pick(("http", "grpc", "nats")),
        "version": src.pick(("1.2.3", "", "2.0.0-rc.1+build.5")),
        "health_endpoint": src.pick(("/health", "/healthz?full=1")),
        "metadata": src.pick(METADATA),
        "transport_preferences": src.pick((["nats"], ["http", "grpc"], [])),
        "heartbeat_interval_s": src.pick((10.0, 0.5, 3600)),
        "ttl_s": src.pick((30.0, 3600.5, 10800)),
        "expire_after_s": src.pick((60, 0.25, 604800)),
        "depends_on": src.pick(([], ["payments", "redis"])),
    }
    for key, value in optional.items():
        if not chance(src, 3):
            msg[key] = value
    if "ttl_s" in msg and msg["ttl_s"] < msg.get("heartbeat_interval_s", 10.0):
        del msg["ttl_s"]
    return msg


def heartbeat(src: Source) -> dict[str, Any]:
    msg: dict[str, Any] = {"service_name": name(src), "instance_id": name(src)[:60] + "-1"}
    if not chance(src, 3):
        msg["status"] = src.pick(("healthy", "degraded", "unhealthy"))
    if not chance(src, 3):
        msg["load"] = src.pick((0.25, 0, 1e300, 7))
    if not chance(src, 3):
        msg["checks"] = src.pick(CHECKS)
    return msg


def deregister(src: Source) -> dict[str, Any]:
    return {"service_name": name(src), "instance_id": name(src)[:60] + "-1"}


def query(src: Source, view: str) -> dict[str, Any]:
    """A valid body for ``hub.query.<view>``."""
    common: dict[str, Any] = {"min_seq": src.pick((0, 1)),
                              "correlation_id": src.pick(("c-1", "ü" * 10))}  # fmt: skip
    fields: dict[str, Any] = {
        "services": {"name": name(src), "status": "HEALTHY", "version": "1.0",
                     "limit": src.pick((1, 5000)), "cursor": None},
        "service": {"service_name": name(src), "limit": 10},
        "instances": {"service_name": name(src), "healthy_only": True,
                      "pick": src.pick(("round_robin", "random", "least_load")),
                      "version": "1.2.3", "metadata": {"region": "eu-1", "w": 3}},
        "health": {"service_name": name(src)},
        "infrastructure": {"component": src.pick(("hub-nats", "hub-redis"))},
        "alerts": {"state": src.pick(("active", "all", "resolved")), "severity": "critical",
                   "labels": {"service": name(src)}, "limit": src.pick((1, 1000)),
                   "matchers": [src.pick(('service="orders"', "alertname=~Serv.*",
                                          {"name": "a", "op": "!~", "value": "x|y"}))],
                   "since": src.pick(("2025-06-15T12:00:00Z", 1_750_000_000)),
                   "until": src.pick(("2035-01-01", 2_050_000_000.5))},
    }[view]  # fmt: skip
    msg = {**common, **fields}
    required = {"service", "instances"}
    return {k: v for k, v in msg.items()
            if (k == "service_name" and view in required) or not chance(src, 3)}  # fmt: skip


BUILDERS: dict[str, Callable[[Source], dict[str, Any]]] = {
    "register": register,
    "heartbeat": heartbeat,
    "deregister": deregister,
}


# --- byte mutations ----------------------------------------------------------------

_TOKEN = re.compile(rb'(?P<s>"(?:[^"\\]|\\.)*")|(?P<n>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)', re.S)
_KEY_AFTER = re.compile(rb"\s*:")


def _tokens(data: bytes, kind: str) -> list[tuple[int, int]]:
    """Spans of string keys (``key``), string values (``value``) or numbers (``number``)."""
    out = []
    for m in _TOKEN.finditer(data):
        if m.group("s") is not None:
            is_key = _KEY_AFTER.match(data, m.end()) is not None
            if (kind == "key") == is_key and kind != "number":
                out.append(m.span())
        elif kind == "number":
            out.append(m.span())
    return out


def _position(src: Source, data: bytes) -> int:
    return src.integer(0, len(data))


def _in_string(src: Source, data: bytes, insert: bytes) -> bytes:
    """``insert`` placed inside a string key or value (anywhere if there is none)."""
    spans = _tokens(data, src.pick(("value", "key")))
    if not spans:
        i = _position(src, data)
        return data[:i] + insert + data[i:]
    start, end = src.pick(spans)
    i = src.integer(start + 1, end - 1)
    return data[:i] + insert + data[i:]


def bad_utf8_in_string(src: Source, data: bytes) -> bytes:
    return _in_string(src, data, bad_utf8(src))


def bad_utf8_anywhere(src: Source, data: bytes) -> bytes:
    i = _position(src, data)
    return data[:i] + bad_utf8(src) + data[i:]


def string_replaced_by_bad_bytes(src: Source, data: bytes) -> bytes:
    """A whole string value becomes bad bytes (the poison: ``"service_name":"\\xff..."``)."""
    spans = _tokens(data, src.pick(("value", "key")))
    if not spans:
        return data
    start, end = src.pick(spans)
    content = bad_utf8(src) + src.pick((b"", b"poison", b"\xff" * 3))
    return data[: start + 1] + content + data[end - 1 :]


def escape_in_string(src: Source, data: bytes) -> bytes:
    return _in_string(src, data, src.pick(ESCAPES))


def control_in_string(src: Source, data: bytes) -> bytes:
    return _in_string(src, data, src.pick(CONTROL))


def truncated(src: Source, data: bytes) -> bytes:
    return data[: src.integer(0, max(len(data) - 1, 0))]


def byte_flipped(src: Source, data: bytes) -> bytes:
    if not data:
        return data
    i = src.integer(0, len(data) - 1)
    return data[:i] + bytes([data[i] ^ src.integer(1, 255)]) + data[i + 1 :]


def byte_inserted(src: Source, data: bytes) -> bytes:
    i = _position(src, data)
    return data[:i] + bytes([src.integer(0, 255)]) + data[i:]


def span_deleted(src: Source, data: bytes) -> bytes:
    i = _position(src, data)
    return data[:i] + data[i + src.integer(1, 8) :]


def nested(src: Source, depth: int) -> bytes:
    """``depth`` levels of arrays or objects, closed or not."""
    opener, closer = src.pick(((b"[", b"]"), (b'{"a":', b"}"), (b'[{"a":', b"}]")))
    depth = min(depth, MAX_BYTES // (2 * len(opener)))
    inner = src.pick((b"1", b"[]", b"{}", b'"x"', b"1e999999"))
    close = closer * depth if not chance(src, 4) else closer * src.integer(0, depth)
    return opener * depth + inner + close


def _free_form(data: bytes, field: bytes, entry: bytes) -> bytes:
    """``entry`` (``"key":value``) added to the object ``field`` (created if absent)."""
    marker = b'"' + field + b'":{'
    at = data.find(marker)
    if at >= 0:
        i = at + len(marker)
        rest = data[i:].lstrip()
        return data[:i] + entry + (b"" if rest.startswith(b"}") else b",") + data[i:]
    brace = data.find(b"{")
    if brace < 0:
        return data
    return data[: brace + 1] + marker + entry + b"}," + data[brace + 1 :]


def _replace_value(src: Source, data: bytes, value: bytes) -> bytes:
    """A number or string value of the message replaced by ``value``."""
    spans = _tokens(data, src.pick(("number", "value")))
    if not spans:
        return data
    start, end = src.pick(spans)
    return data[:start] + value + data[end:]


def deep_nesting(src: Source, data: bytes) -> bytes:
    value = nested(src, src.pick(DEPTHS))
    where = src.pick(("checks", "metadata", "value", "unknown", "whole"))
    if where == "whole":
        return value
    if where == "unknown":
        return _free_form(data, b"zz", b'"deep":' + value)
    if where == "value":
        return _replace_value(src, data, value)
    return _free_form(data, where.encode(), b'"deep":' + value)


def huge_number(src: Source, data: bytes) -> bytes:
    number = src.pick(HUGE)
    where = src.pick(("number", "value", "checks", "metadata", "field"))
    if where == "number":
        spans = _tokens(data, "number")
        if spans:
            start, end = src.pick(spans)
            return data[:start] + number + data[end:]
        where = "checks"
    if where == "value":
        return _replace_value(src, data, number)
    if where == "field":
        field = src.pick((b"port", b"load", b"heartbeat_interval_s", b"ttl_s",
                          b"expire_after_s", b"min_seq", b"limit"))  # fmt: skip
        return _duplicated(data, field, number, last=True)
    return _free_form(data, where.encode(), b'"n":' + number)


def _duplicated(data: bytes, key: bytes, value: bytes, *, last: bool) -> bytes:
    entry = b'"' + key + b'":' + value
    if last:
        end = data.rfind(b"}")
        if end < 0:
            return data
        return data[:end] + b"," + entry + data[end:]
    start = data.find(b"{")
    if start < 0:
        return data
    return data[: start + 1] + entry + b"," + data[start + 1 :]


def duplicate_key(src: Source, data: bytes) -> bytes:
    """A key again with another value, before (the original wins) or after (it wins)."""
    keys = [data[s + 1 : e - 1] for s, e in _tokens(data, "key")] or [b"service_name"]
    value = src.pick((b'"orders"', b"1", b"null", b"{}", b"[]", b'"\xff"', b"1e999999",
                      b'"a\\u0000b"', b"true", b'"x-1"'))  # fmt: skip
    return _duplicated(data, src.pick(keys), value, last=src.pick((True, False)))


def byte_order_mark(src: Source, data: bytes) -> bytes:
    how = src.pick(("prefix", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "suffix"))
    if how == "prefix":
        return src.pick(BOMS) + data
    if how == "suffix":
        return data + src.pick((b"\x00", b"\xef\xbb\xbf", b" \r\n\t", b"\x00" * 3))
    try:
        return data.decode("utf-8").encode(how)
    except UnicodeDecodeError:
        return src.pick(BOMS) + data


MUTATIONS: tuple[Callable[[Source, bytes], bytes], ...] = (
    bad_utf8_in_string, string_replaced_by_bad_bytes, bad_utf8_anywhere, escape_in_string,
    control_in_string, truncated, byte_flipped, byte_inserted, span_deleted, deep_nesting,
    huge_number, duplicate_key, byte_order_mark,
)  # fmt: skip


def mutate(src: Source, data: bytes) -> bytes:
    """One to three mutations of ``data`` (at most ``MAX_BYTES`` long)."""
    for _ in range(src.integer(1, 3)):
        changed = src.pick(MUTATIONS)(src, data)
        if len(changed) <= MAX_BYTES:
            data = changed
    return data


def encode(msg: dict[str, Any]) -> bytes:
    return msgspec.json.encode(msg)


def ingress_payload(src: Source, kind: str) -> bytes:
    return mutate(src, encode(BUILDERS[kind](src)))


def query_payload(src: Source, view: str) -> bytes:
    return mutate(src, encode(query(src, view)))


# --- subjects ----------------------------------------------------------------------

# nats-server takes any bytes in a subject but whitespace; '.' separates tokens and a
# token of exactly '*' or '>' is a wildcard (not publishable).
_SUBJECT_BYTES = bytes(b for b in range(256) if b not in b" \t\r\n\x0b\x0c.")
TENANTS = (b"acme", b"default", b"evil", b"Bad*Tenant", b"a.b", b"t" * 64, b"z\xc3\xbcrich",
           b"\x00", b"_invalid", b"-x", b"ACME")  # fmt: skip


def tenant_token(src: Source) -> bytes:
    how = src.pick(("listed", "bad-utf8", "random"))
    if how == "listed":
        return src.pick(TENANTS)
    if how == "bad-utf8":
        base = src.pick(TENANTS[:3])
        i = src.integer(0, len(base))
        return base[:i] + bad_utf8(src) + base[i:]
    token = bytes(src.pick(_SUBJECT_BYTES) for _ in range(src.integer(1, 12)))
    return b"x" + token if token in (b"*", b">") else token


def subject(src: Source, prefix: bytes, kind: bytes) -> bytes:
    """``<prefix>.<kind>[.<tenant>]``, the kind or the tenant sometimes mutated."""
    if chance(src, 6):
        kind = kind[:-1] + bad_utf8(src) if chance(src, 2) else kind.upper()
    if chance(src, 3):
        return prefix + b"." + kind
    return prefix + b"." + kind + b"." + tenant_token(src)


def as_delivered(raw_subject: bytes) -> str:
    """The subject as the hub sees it: ``hub.natsconn.HubClient`` escapes bad bytes."""
    return raw_subject.decode("utf-8", "backslashreplace")


# --- hypothesis strategies ---------------------------------------------------------


@st.composite
def ingress_messages(draw: Any, kinds: Sequence[str] = INGRESS_KINDS) -> tuple[str, bytes]:
    """(kind, mutated payload) of an ingress message."""
    src = Drawn(draw)
    kind = src.pick(kinds)
    return kind, ingress_payload(src, kind)


@st.composite
def query_messages(draw: Any, views: Sequence[str] = QUERY_VIEWS) -> tuple[str, bytes]:
    """(view, mutated body) of a query."""
    src = Drawn(draw)
    view = src.pick(views)
    return view, query_payload(src, view)


@st.composite
def ingress_subjects(draw: Any) -> bytes:
    """A raw ingress subject (bytes, as published), often broken."""
    src = Drawn(draw)
    return subject(src, b"hub", src.pick(tuple(k.encode() for k in INGRESS_KINDS)))


@st.composite
def query_subjects(draw: Any) -> bytes:
    """A raw query subject (bytes, as published), often broken."""
    src = Drawn(draw)
    return subject(src, b"hub.query", src.pick(tuple(v.encode() for v in QUERY_VIEWS)))


# --- seeded corpora (for the real servers) -----------------------------------------


def ingress_corpus(seed: int, n: int, *, valid_share: int = 5) -> list[tuple[bytes, bytes]]:
    """``n`` (raw subject, payload) pairs, the same for the same seed.

    About one in ``valid_share`` is a valid registration, heartbeat or deregistration
    (heartbeats and deregistrations of instances registered before, on their tenant);
    the rest are mutated messages on mostly well-formed subjects.
    """
    src = Seeded(seed)
    registered: list[tuple[bytes, dict[str, Any]]] = []
    out: list[tuple[bytes, bytes]] = []
    for _ in range(n):
        if src.integer(1, valid_share) == 1:
            tenant = src.pick((b"", b".acme"))
            if registered and chance(src, 3):
                tenant, reg = src.pick(registered)
                ident = {"service_name": reg["service_name"], "instance_id": reg["instance_id"]}
                if chance(src, 4):
                    out.append((b"hub.deregister" + tenant, encode(ident)))
                else:
                    out.append((b"hub.heartbeat" + tenant, encode({**heartbeat(src), **ident})))
                continue
            reg = register(src)
            reg.setdefault("instance_id", name(src)[:60] + "-1")
            registered.append((tenant, reg))
            out.append((b"hub.register" + tenant, encode(reg)))
            continue
        kind = src.pick(INGRESS_KINDS)
        payload = ingress_payload(src, kind)
        if chance(src, 5):
            raw_subject = subject(src, b"hub", kind.encode())
        else:
            raw_subject = b"hub." + kind.encode() + src.pick((b"", b".acme"))
        out.append((raw_subject, payload))
    return out


def query_corpus(seed: int, n: int) -> list[tuple[bytes, bytes]]:
    """``n`` (raw query subject, body) pairs, the same for the same seed."""
    src = Seeded(seed)
    out = []
    for _ in range(n):
        view = src.pick(QUERY_VIEWS)
        body = query_payload(src, view)
        if chance(src, 4):
            raw_subject = subject(src, b"hub.query", view.encode())
        else:
            raw_subject = b"hub.query." + view.encode()
        out.append((raw_subject, body))
    return out


# --- named cases (each an @example of the properties) ------------------------------

_REG = b'{"service_name":"orders","instance_id":"orders-1","host":"10.0.0.5","port":8080'
_HB = b'{"service_name":"orders","instance_id":"orders-1"'

# The messages that crashed the hub: invalid UTF-8 inside the service name.
POISON: tuple[bytes, ...] = (
    b'{"service_name":"\xff\xfe\xfd","host":"10.0.0.5","port":8080}',
    b'{"service_name":"\xed\xa0\x80","host":"10.0.0.5","port":8080}',
)


def _deep(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    return opener * depth + b"1" + closer * depth


# (kind, payload) for every named kind of damage.
NAMED_INGRESS: tuple[tuple[str, bytes], ...] = (
    *(("register", p) for p in POISON),
    ("register", _REG + b',"metadata":{"k\xff":"v"}}'),  # invalid UTF-8 in a key
    ("register", _REG + b',"\xff\xfe":1}'),  # ... in an unknown key (msgspec skips those)
    ("register", _REG + b',"metadata":{"k":"v\xff"}}'),  # ... in a value
    ("register", _REG + b',"version":"\xc0\xaf"}'),  # overlong '/'
    ("register", _REG + b',"metadata":{"k":"\xe0\x80\xaf"}}'),  # overlong '/', 3 bytes
    ("register", _REG + b',"metadata":{"k":"\xed\xbf\xbf"}}'),  # encoded low surrogate
    ("heartbeat", _HB + b',"checks":{"\xed\xa0\x80\xed\xb0\x80":1}}'),  # CESU-8 pair
    ("register", _REG + b',"metadata":{"k":"\\ud800"}}'),  # escaped lone surrogate
    ("heartbeat", _HB + b',"checks":{"\\udc00":"x"}}'),
    ("register", _REG[:37]),  # truncated
    ("register", _REG[:-1]),
    ("heartbeat", _HB + b',"checks":{"deep":' + _deep(5000) + b"}}"),  # deep nesting
    ("heartbeat", _HB + b',"checks":{"deep":' + _deep(990) + b"}}"),
    ("heartbeat", _HB + b',"checks":{"deep":' + _deep(62) + b"}}"),
    ("heartbeat", _HB + b',"checks":{"deep":' + _deep(5000, b'{"a":', b"}") + b"}}"),
    ("register", _REG + b',"metadata":{"deep":' + _deep(3000) + b"}}"),
    ("register", _REG + b',"zz":' + _deep(20_000) + b"}"),
    ("register", _deep(20_000)),
    ("register", b"[" * 20_000),
    ("register", _REG.replace(b"8080", b"1e999999") + b"}"),  # huge numbers
    ("register", _REG.replace(b"8080", b"1" + b"0" * 400) + b"}"),
    ("register", _REG + b',"heartbeat_interval_s":1e999999}'),
    ("register", _REG + b',"ttl_s":-1e400}'),
    ("register", _REG + b',"expire_after_s":1' + b"0" * 400 + b"}"),
    ("heartbeat", _HB + b',"load":1e999999}'),
    ("heartbeat", _HB + b',"load":1' + b"0" * 400 + b"}"),
    ("heartbeat", _HB + b',"load":1.7976931348623159e308}'),
    ("register", _REG + b',"metadata":{"n":1e999999}}'),
    ("register", _REG + b',"metadata":{"n":-1e400}}'),
    ("register", _REG + b',"metadata":{"n":1' + b"0" * 400 + b"}}"),
    ("heartbeat", _HB + b',"checks":{"n":[1e999999]}}'),
    ("heartbeat", _HB + b',"checks":{"n":{"m":-' + b"9" * 400 + b"}}}"),
    ("register", _REG + b',"metadata":{"k":"a\\u0000b"}}'),  # NUL and control characters
    ("heartbeat", _HB + b',"checks":{"a\\u0000":1}}'),
    ("heartbeat", _HB + b',"checks":{"x":{"y\\u0000":1}}}'),
    ("register", _REG + b',"metadata":{"k":"a\x00b"}}'),
    ("register", _REG + b',"metadata":{"k":"\\u001b[31m\\r\\n"}}'),
    ("register", _REG + b"}\x00"),
    ("register", _REG + b',"port":1e999999}'),  # duplicate keys (the last one wins)
    ("register", _REG + b',"service_name":"\xff"}'),
    ("heartbeat", _HB + b',"status":"healthy","status":"great"}'),
    ("heartbeat", _HB + b',"status":"\\u0000\\r\\n"}'),  # quoted in the reason
    ("register", b"\xef\xbb\xbf" + _REG + b"}"),  # byte order marks
    ("register", b"\xff\xfe" + (_REG + b"}").decode().encode("utf-16-le")),
    ("register", (_REG + b"}").decode().encode("utf-16")),
    ("register", b"\xff\xfe\x00garbage"),
)

# Raw subjects (bytes, as published) of the named cases.
NAMED_SUBJECTS: tuple[bytes, ...] = (
    b"hub.register.\xff", b"hub.register.\xff\xfe", b"hub.heartbeat.\xed\xa0\x80",
    b"hub.register.ac\xc0\xafme", b"hub.register.\x00", b"hub.register.a.b", b"hub.regist\xff",
    b"hub.register.\\xff", b"hub.register." + b"t" * 64, b"hub.register.z\xc3\xbcrich",
    b"hub", b"hub.", b"",
)  # fmt: skip

# (view, body) of the named query cases.
NAMED_QUERIES: tuple[tuple[str, bytes], ...] = (
    ("services", b'{"name":"\xff\xfe\xfd"}'),
    ("service", b'{"service_name":"\xed\xa0\x80"}'),
    ("services", b'{"\xff":1}'),
    ("instances", b'{"service_name":"orders","metadata":{"k":"\xe0\x80\xaf"}}'),
    ("instances", b'{"service_name":"orders","metadata":{"k":"\\ud800"}}'),
    ("instances", b'{"service_name":"orders","metadata":{"k":' + _deep(5000) + b"}}"),
    ("services", b'{"zz":' + _deep(20_000) + b"}"),
    ("health", _deep(20_000)),
    ("services", b'{"min_seq":1e999999}'),
    ("services", b'{"min_seq":1' + b"0" * 400 + b"}"),
    ("services", b'{"limit":-1e400}'),
    ("instances", b'{"service_name":"orders","metadata":{"n":1' + b"0" * 400 + b"}}"),
    ("infrastructure", b'{"component":"a\\u0000b"}'),
    ("infrastructure", b'{"component":"a\x00b"}'),
    ("alerts", b'{"matchers":["a=~\\"(\\""]}'),
    ("alerts", b'{"since":"1e999999"}'),
    ("alerts", b'{"since":1e308,"until":-1e308}'),
    ("alerts", b'{"include":"silences","labels":{"a":"b"}}'),
    ("services", b'{"name":"orders","name":"\xff"}'),
    ("services", b'{"\\u0000min_seq\\r\\n":0}'),  # an unknown field, quoted in the reason
    ("services", b"\xef\xbb\xbf{}"),
    ("services", b"\xff\xfe\x00garbage"),
    ("service", b'{"service_name":"orders"'),
)
