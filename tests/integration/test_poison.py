"""No message stops the hub: poison bytes and a fuzzed corpus against the real servers.

Messages are published as any sender could: with nats-py, and over a bare socket
speaking the NATS protocol (nats-py will not publish a subject that is not UTF-8;
nats-server takes any bytes but whitespace). Each one is recorded or dead-lettered,
the hub keeps serving, and a restarted hub starts cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest

from events.model import HeartbeatReceived, InputRejected
from events.subjects import DLQ_STREAM, DLQ_SUBJECT, INGRESS_STREAM
from hub.bootstrap import make_event_log
from tests.fuzzing import INGRESS_KINDS, POISON, ingress_corpus, query_corpus
from tests.integration.conftest import eventually, query

OK = b'{"service_name":"orders","instance_id":"orders-1","host":"10.0.0.5","port":8080}'
AFTER = b'{"service_name":"after","instance_id":"after-1","host":"10.0.0.6","port":8081}'
SEED = 20_251_130
CORPUS_SIZE = 5000
QUERIES = 500
QUERY_ERROR_CODES = {
    "MALFORMED_UTF8", "MALFORMED_JSON", "INVALID_REQUEST", "UNKNOWN_QUERY", "INVALID_TENANT",
    "UNKNOWN_TENANT", "NOT_FOUND", "NOT_YET_PROCESSED", "PAYLOAD_TOO_LARGE", "BUSY",
}  # fmt: skip


class RawNats:
    """A bare NATS protocol client on a socket: publishes any bytes as a subject or
    as headers, and collects what the server sends (messages, errors)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.messages: list[tuple[bytes, bytes]] = []  # (subject, payload)
        self.errors: list[bytes] = []
        self._pongs = 0
        self._pong = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str) -> RawNats:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        info = await reader.readline()
        assert info.startswith(b"INFO "), info
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        return cls(reader, writer)

    def pub(self, subject: bytes, payload: bytes, reply: bytes = b"") -> None:
        reply = reply + b" " if reply else b""
        self._writer.write(b"PUB %s %s%d\r\n%s\r\n" % (subject, reply, len(payload), payload))

    def hpub(self, subject: bytes, headers: bytes, payload: bytes, reply: bytes = b"") -> None:
        reply = reply + b" " if reply else b""
        size = len(headers) + len(payload)
        frame = b"HPUB %s %s%d %d\r\n%s%s\r\n" % (subject, reply, len(headers), size, headers,
                                                  payload)  # fmt: skip
        self._writer.write(frame)

    def sub(self, subject: bytes, sid: int) -> None:
        self._writer.write(b"SUB %s %d\r\n" % (subject, sid))

    async def ping(self) -> None:
        """Send PING and wait for its PONG: the server has processed all sent before."""
        await self._writer.drain()
        expected = self._pongs + 1
        self._writer.write(b"PING\r\n")
        await eventually(lambda: self._pongs >= expected, timeout=30, interval=0.02)

    async def drain(self) -> None:
        await self._writer.drain()

    async def _read(self) -> None:
        while line := await self._reader.readline():
            if line.startswith(b"MSG ") or line.startswith(b"HMSG "):
                tokens = line.split()
                data = await self._reader.readexactly(int(tokens[-1]) + 2)
                if line.startswith(b"HMSG "):
                    data = data[int(tokens[-2]) :]
                self.messages.append((tokens[1], data[:-2]))
            elif line.startswith(b"PING"):
                self._writer.write(b"PONG\r\n")
            elif line.startswith(b"PONG"):
                self._pongs += 1
            elif line.startswith(b"-ERR"):
                self.errors.append(line)

    async def close(self) -> None:
        self._task.cancel()
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


@pytest.fixture
async def raw(hub_config):
    client = await RawNats.connect(hub_config.nats_urls[0])
    yield client
    await client.close()


async def dead_letters(nc, count: int) -> list[Any]:
    """The first ``count`` dead letters on HUB_DLQ, in order."""
    sub = await nc.jetstream().subscribe(DLQ_SUBJECT, stream=DLQ_STREAM, ordered_consumer=True)
    try:
        return [await sub.next_msg(timeout=20) for _ in range(count)]
    finally:
        await sub.unsubscribe()


async def stream_messages(nc, stream: str) -> int:
    return int((await nc.jetstream().stream_info(stream)).state.messages)


async def test_poison_messages_are_dead_lettered_and_the_hub_serves_and_restarts(
    start_hub, nc, raw
):
    """The messages that crashed the hub or silenced its connection — a registration
    whose service_name is ``\\xff...`` or an encoded surrogate, a subject that is not
    UTF-8 (``PUB hub.register.\\xff\\xfe`` on a bare socket), headers that are not
    UTF-8 (HPUB, also as a status line) — are each dead-lettered on hub.dlq with their
    reason code; the hub keeps serving (a valid registration afterwards is answered with
    min_seq) and the ingress stream drains. Stopped with the same poison waiting
    unacknowledged (the old hub's crash loop), a new hub starts cleanly, dead-letters
    just those (nothing recorded is decided again) and serves."""
    hub = await start_hub()
    js = nc.jetstream()
    bad_key = b'{"\xff":1,"service_name":"orders","host":"10.0.0.5","port":8080}'
    bad_instance = b'{"service_name":"orders","instance_id":"\xed\xbf\xbf"}'
    # payload -> (reason code, Hub-Subject, Hub-Tenant)
    expected = {
        POISON[0]: ("MALFORMED_UTF8", "hub.register", "default"),
        POISON[1]: ("MALFORMED_UTF8", "hub.register", "default"),
        OK: ("INVALID_TENANT", "hub.register.\\xff\\xfe", "_invalid"),
        bad_key: ("MALFORMED_UTF8", "hub.register", "default"),
        bad_instance: ("MALFORMED_UTF8", "hub.heartbeat", "default"),
    }
    for payload in POISON:
        await js.publish("hub.register", payload)
    raw.pub(b"hub.register.\xff\xfe", OK)
    raw.hpub(b"hub.register", b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\xc0\xaf: v\r\n\r\n", bad_key)
    raw.hpub(b"hub.heartbeat", b"NATS/1.0 \xff\xfe\r\n\r\n", bad_instance)
    await raw.ping()
    assert raw.errors == []

    letters = await dead_letters(nc, len(expected))
    got = {m.data: (m.headers["Hub-Reason-Code"], m.headers["Hub-Subject"],
                    m.headers["Hub-Tenant"]) for m in letters}  # fmt: skip
    assert got == expected
    assert all(m.headers["Hub-Reason"] for m in letters)

    # The hub keeps serving: a valid registration afterwards is answered (min_seq).
    ack = await js.publish("hub.register", OK)
    reply = await query(nc, "hub.query.services", {"min_seq": ack.seq})
    assert reply["success"], reply
    assert [s["service_name"] for s in reply["data"]] == ["orders"]
    assert hub.metrics.get("ingress_rejected") == len(expected)
    await eventually(lambda: _equals(stream_messages(nc, INGRESS_STREAM), 0))

    # Stopped, with poison waiting unacknowledged in the ingress stream (as after a crash,
    # the case that made the old hub die at every restart): a new hub on the same servers
    # starts cleanly, dead-letters only those, and serves.
    await hub.stop()
    for payload in POISON:
        await js.publish("hub.register", payload)
    raw.pub(b"hub.register.\xff\xfe", OK)
    await raw.ping()
    again = await start_hub()
    ack = await js.publish("hub.register", AFTER)
    reply = await query(nc, "hub.query.services", {"min_seq": ack.seq})
    assert sorted(s["service_name"] for s in reply["data"]) == ["after", "orders"], reply
    assert again.metrics.get("ingress_rejected") == 3
    letters = await dead_letters(nc, len(expected) + 3)
    assert [m.headers["Hub-Reason-Code"] for m in letters[len(expected) :]] == [
        "MALFORMED_UTF8", "MALFORMED_UTF8", "INVALID_TENANT"
    ]  # fmt: skip
    assert await stream_messages(nc, DLQ_STREAM) == len(expected) + 3
    await eventually(lambda: _equals(stream_messages(nc, INGRESS_STREAM), 0))


async def _equals(value: Any, expected: Any) -> bool:
    return await value == expected


async def _answered(nc, min_seq: int) -> dict[str, Any] | None:
    reply = await query(nc, "hub.query.services", {"min_seq": min_seq})
    if reply["error_code"] == "NOT_YET_PROCESSED":
        return None
    assert reply["success"], reply
    return reply


def captured(subject: bytes) -> bool:
    """Whether the ingress stream captures ``subject`` (``hub.<kind>[.>]``)."""
    tokens = subject.split(b".")
    return len(tokens) >= 2 and tokens[0] == b"hub" and tokens[1].decode("latin-1") in INGRESS_KINDS


def kind_of(subject: bytes) -> str:
    return subject.split(b".")[1].decode("latin-1")


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def test_a_fuzzed_corpus_is_recorded_or_dead_lettered_and_queries_answered(
    start_hub, hub_config, nc, raw, pg
):
    """Thousands of mutated ingress messages (a fixed seed: the same corpus every run),
    interleaved with valid registrations, heartbeats and deregistrations, published on
    the ingress subjects (broken subjects too): the hub stays up; the ingress stream
    drains; the dead letters carry exactly the ingress sequences the hub rejected, each
    with the original bytes; every other sequence is an event in the log (heartbeats:
    rolled up to one per instance, counted by the hub); the views took every rejection.
    Then hundreds of mutated queries, on broken subjects too, each get a StandardResponse
    (success, or an error with a documented code) and the responder keeps answering."""
    hub = await start_hub(tenants=frozenset({"default", "acme"}), min_seq_wait_s=0.2)
    js = nc.jetstream()

    corpus = ingress_corpus(SEED, CORPUS_SIZE)
    for i, (subject, payload) in enumerate(corpus):
        raw.pub(subject, payload)
        if i % 100 == 0:
            await raw.drain()
    await raw.ping()
    assert raw.errors == []
    # One connection, in order: the n-th captured message is ingress sequence n.
    by_seq = {seq: m for seq, m in enumerate((m for m in corpus if captured(m[0])), 1)}
    last = (await js.publish("hub.register", OK)).seq
    assert last == len(by_seq) + 1, "every captured message is in the ingress stream"

    # Waits of 0.2 s for min_seq (the mutated queries below ask for far sequences): retry.
    reply = await eventually(lambda: _answered(nc, last), timeout=60)
    assert "orders" in [s["service_name"] for s in reply["data"]]
    await eventually(lambda: _equals(stream_messages(nc, INGRESS_STREAM), 0), timeout=30)

    # The event log: one event per ingress sequence (its id derived from it).
    log = make_event_log(hub_config, nc, read_only=True)
    await log.start()
    primary: dict[int, Any] = {}
    try:
        async for records in log.read(None, follow=False):
            for r in records:
                e = r.event
                if e.ingress_seq and e.event_id == f"ingress-{e.ingress_seq}":
                    assert e.ingress_seq not in primary, e
                    primary[e.ingress_seq] = e
    finally:
        await log.close()
    rejected = {seq for seq, e in primary.items() if isinstance(e, InputRejected)}

    # The dead letters: exactly the rejected sequences, with the original bytes.
    count = await stream_messages(nc, DLQ_STREAM)
    letters = {int(m.headers["Hub-Ingress-Seq"]): m for m in await dead_letters(nc, count)}
    assert len(letters) == count
    assert set(letters) == rejected
    codes: Counter[str] = Counter()
    for seq, m in letters.items():
        subject, payload = by_seq[seq]
        assert m.data == payload
        assert m.headers["Hub-Reason-Code"] == primary[seq].reason_code
        codes[primary[seq].reason_code] += 1
        if not is_utf8(subject):
            assert primary[seq].reason_code == "INVALID_TENANT", (subject, m.headers)
        elif not is_utf8(payload) and subject.split(b".")[2:] in ([], [b"acme"], [b"default"]):
            assert primary[seq].reason_code == "MALFORMED_UTF8", (subject, m.headers)
    assert "INTERNAL_ERROR" not in codes, codes
    assert codes["MALFORMED_UTF8"] > 300 and codes["MALFORMED_JSON"] > 100, codes

    # Every other sequence is a recorded event; missing ones are rolled-up heartbeats.
    missing = set(range(1, last + 1)) - set(primary)
    assert all(kind_of(by_seq[seq][0]) == "heartbeat" for seq in missing)
    heartbeats_logged = sum(isinstance(e, HeartbeatReceived) for e in primary.values())
    assert len(missing) == hub.metrics.get("ingress_HeartbeatReceived") - heartbeats_logged
    assert hub.metrics.get("ingress_rejected") == len(rejected)

    # The views took it all: every rejection stored in PostgreSQL, both views caught up.
    await eventually(
        lambda: all(hub.progress.reflects(p.name, last) for p in hub.projections), timeout=30
    )
    sql = "SELECT count(*) FROM input_rejections"
    await eventually(lambda: _equals(pg.fetchval(sql), len(rejected)), timeout=30)

    await mutated_queries_are_answered(nc, raw)


async def mutated_queries_are_answered(nc, raw: RawNats) -> None:
    """Mutated query bodies on hub.query.* (subjects that are not UTF-8 over the bare
    socket) each get a StandardResponse; then a good query still succeeds."""
    replies: list[dict[str, Any]] = []
    by_socket = []
    by_client = []
    for subject, body in query_corpus(SEED, QUERIES):
        (by_client if is_utf8(subject) else by_socket).append((subject, body))
    by_socket += [(b"hub.query.services.\xff\xfe", b"{}"), (b"hub.query.\xff", b"{}"),
                  (b"hub.query.service.\xed\xa0\x80", b'{"service_name":"orders"}')]  # fmt: skip

    async def ask(subject: bytes, body: bytes) -> None:
        replies.append(await query(nc, subject.decode(), body, timeout=20))

    for at in range(0, len(by_client), 50):
        await asyncio.gather(*(ask(s, b) for s, b in by_client[at : at + 50]))
    raw.sub(b"_INBOX.raw.>", 1)
    for i, (subject, body) in enumerate(by_socket):
        raw.pub(subject, body, reply=b"_INBOX.raw.%d" % i)
    await raw.ping()
    assert raw.errors == []
    await eventually(lambda: len(raw.messages) >= len(by_socket), timeout=30)
    replies += [msgspec.json.decode(data) for _subject, data in raw.messages]

    assert len(replies) == len(by_client) + len(by_socket)
    for reply in replies:
        assert set(reply) >= {"success", "data", "error_code", "error_message"}, reply
        if not reply["success"]:
            assert reply["error_code"] in QUERY_ERROR_CODES, reply
            assert reply["error_message"], reply
    codes = Counter(r["error_code"] for r in replies)
    assert codes["MALFORMED_UTF8"] and codes["INVALID_TENANT"], codes
    reply = await query(nc, "hub.query.services", {})
    assert reply["success"] is True, reply


async def test_a_query_whose_headers_are_not_utf8_leaves_the_responder_answering(
    start_hub, nc, raw
):
    """A query sent with headers that are not UTF-8, in a header line or as the inline
    status line nats-py decodes strictly (``NATS/1.0 \\xff\\xfe``), gets its reply or
    none, and the responder keeps answering the next queries."""
    await start_hub()
    raw.sub(b"_INBOX.raw.>", 1)
    raw.hpub(b"hub.query.services", b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n", b"{}",
             reply=b"_INBOX.raw.1")  # fmt: skip
    raw.hpub(b"hub.query.services", b"NATS/1.0 \xff\xfe\r\n\r\n", b"{}", reply=b"_INBOX.raw.2")
    raw.hpub(b"hub.query.services", b"NATS/1.0 404 \xff\xfe\r\n\r\n", b"{}",
             reply=b"_INBOX.raw.3")  # fmt: skip
    await raw.ping()
    assert raw.errors == []
    reply = await query(nc, "hub.query.services", {}, timeout=5)
    assert reply["success"] is True, reply
