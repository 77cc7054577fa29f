"""Bad input gets a clear error and loses nothing: dead letters, rejection events, error
replies; the hub keeps serving and a valid registration afterwards still shows up."""

from __future__ import annotations

import msgspec
import nats.js.errors
import pytest

from tests.integration.conftest import eventually, query

OK = b'{"service_name":"orders","instance_id":"orders-1","host":"10.0.0.5","port":8080}'

# (subject, payload, expected reason code, expected tenant of the rejection)
BAD_INGRESS = [
    ("hub.register", b'{"service_name": "orders", "host": ', "MALFORMED_JSON", "default"),
    ("hub.register", b"\xff\xfe\x00garbage", "MALFORMED_UTF8", "default"),
    # Invalid UTF-8 inside a string (these crashed the hub), in an unknown key (skipped by
    # the decoder), nesting past the limit, an integer beyond 64 bits.
    ("hub.register", b'{"service_name":"\xff\xfe\xfd","host":"h","port":1}', "MALFORMED_UTF8",
     "default"),
    ("hub.register", b'{"service_name":"\xed\xa0\x80","host":"h","port":1}', "MALFORMED_UTF8",
     "default"),
    ("hub.register", b'{"\xff":1,"service_name":"orders","host":"h","port":1}', "MALFORMED_UTF8",
     "default"),
    ("hub.heartbeat", b'{"service_name":"orders","instance_id":"orders-1","checks":{"x":'
     + b"[" * 5000 + b"]" * 5000 + b"}}", "MALFORMED_JSON", "default"),
    ("hub.register", b'{"service_name":"big","host":"h","port":1,"metadata":{"n":1'
     + b"0" * 400 + b"}}", "INVALID_FIELD", "default"),
    ("hub.register", b'{"service_name":"nul","host":"h","port":1,"metadata":{"k":"a\\u0000b"}}',
     "INVALID_FIELD", "default"),
    ("hub.register", b'{"service_name":"orders","host":"h","port":"80"}', "INVALID_FIELD",
     "default"),
    ("hub.register", b'{"service_name":"orders","port":80}', "INVALID_FIELD", "default"),
    ("hub.register", b'{"service_name":"x\'; DROP TABLE service_registry;--","host":"h","port":1}',
     "INVALID_FIELD", "default"),
    ("hub.register", b'{"service_name":"a:b:c","host":"h","port":1}', "INVALID_FIELD",
     "default"),
    ("hub.register", b'{"service_name":"big","host":"h","port":1,"metadata":{"k":"'
     + b"v" * 9000 + b'"}}', "METADATA_TOO_LARGE", "default"),
    ("hub.heartbeat", b'{"service_name":"ghost","instance_id":"ghost-1"}', "UNKNOWN_INSTANCE",
     "default"),
    ("hub.heartbeat", b'{"service_name":"orders","instance_id":"orders-1","status":"great"}',
     "INVALID_FIELD", "default"),
    ("hub.register.evil", OK, "UNKNOWN_TENANT", "_invalid"),
    ("hub.register.Bad*Tenant", OK, "INVALID_TENANT", "_invalid"),
    ("hub.register.a.b", OK, "INVALID_TENANT", "_invalid"),
]  # fmt: skip


async def test_each_kind_of_bad_input_is_dead_lettered_announced_and_counted(
    start_hub, nc, pg, rds
):
    """Every bad ingress message lands on hub.dlq with its reason and ingress sequence, is
    announced as InputRejected on hub.events.<tenant>.rejected, counted in the hub, Redis
    and PostgreSQL; then a valid registration still shows up (queried with min_seq)."""
    hub = await start_hub(tenants=frozenset({"default", "acme"}))
    js = nc.jetstream()
    announced: list[tuple[str, dict]] = []

    async def on_rejected(msg):
        announced.append((msg.subject, msgspec.json.decode(msg.data)))

    await nc.subscribe("hub.events.*.rejected", cb=on_rejected)
    dlq = await js.subscribe("hub.dlq", stream="HUB_DLQ", ordered_consumer=True)
    await nc.flush()

    sent: dict[int, tuple[str, str, str]] = {}
    payloads: dict[int, bytes] = {}
    for subject, payload, code, tenant in BAD_INGRESS:
        ack = await js.publish(subject, payload)
        sent[ack.seq] = (subject, code, tenant)
        payloads[ack.seq] = payload

    # Dead letters: the original bytes, the reason and the ingress sequence in headers.
    letters = {}
    for _ in BAD_INGRESS:
        m = await dlq.next_msg(timeout=10)
        letters[int(m.headers["Hub-Ingress-Seq"])] = m
    assert set(letters) == set(sent)
    for seq, (subject, code, _tenant) in sent.items():
        m = letters[seq]
        assert m.headers["Hub-Reason-Code"] == code, (subject, m.headers)
        assert m.headers["Hub-Reason"]
        assert m.headers["Hub-Subject"] == subject
        assert m.data == payloads[seq]  # the original bytes, nothing lost

    # Announcements, one per rejected message, on the right tenant's subject.
    await eventually(lambda: len(announced) >= len(BAD_INGRESS))
    by_seq = {e["ingress_seq"]: (subj, e) for subj, e in announced}
    assert set(by_seq) == set(sent)
    for seq, (subject, code, tenant) in sent.items():
        subj, e = by_seq[seq]
        assert subj == f"hub.events.{tenant}.rejected"
        assert (e["type"], e["reason_code"], e["subject"]) == ("InputRejected", code, subject)

    # Reasons a sender can act on.
    wrong_type = next(m for m in letters.values() if b'"port":"80"' in m.data)
    assert "`$.port`" in wrong_type.headers["Hub-Reason"]

    # Then a valid registration still shows up, read-your-writes via min_seq.
    ack = await js.publish("hub.register", OK)
    reply = await query(nc, "hub.query.services", {"min_seq": ack.seq})
    assert reply["success"], reply
    assert [s["service_name"] for s in reply["data"]] == ["orders"]

    # Counted: in the hub, in the Redis view, in PostgreSQL.
    assert hub.metrics.get("ingress_rejected") == len(BAD_INGRESS)
    assert hub.metrics.get("dlq_published") == len(BAD_INGRESS)
    default_count = sum(1 for *_, t in BAD_INGRESS if t == "default")
    assert int(await rds.hget("hub:default:stats", "rejected")) == default_count
    assert int(await rds.hget("hub:_invalid:stats", "rejected")) == 3
    await eventually(lambda: _count(pg, "SELECT count(*) FROM input_rejections", len(BAD_INGRESS)))
    # The injection attempt reached PostgreSQL only as inert text.
    await eventually(lambda: _count(pg, "SELECT count(*) FROM service_registry", 1))


async def _count(pg, sql: str, expected: int) -> bool:
    return await pg.fetchval(sql) == expected


async def test_oversized_message_is_refused_at_the_door(start_hub, nc):
    """A message over the stream's size limit is refused by JetStream with its own error,
    never reaches the hub, and the hub keeps serving."""
    hub = await start_hub(max_message_bytes=4096)
    js = nc.jetstream()
    big = b'{"service_name":"orders","host":"h","port":1,"metadata":{"k":"' + b"x" * 8000 + b'"}}'
    with pytest.raises(nats.js.errors.APIError) as info:
        await js.publish("hub.register", big)
    assert "maximum" in str(info.value).lower() or info.value.err_code == 10054
    ack = await js.publish("hub.register", OK)
    reply = await query(nc, "hub.query.services", {"min_seq": ack.seq})
    assert [s["service_name"] for s in reply["data"]] == ["orders"]
    assert hub.metrics.get("ingress_rejected") == 0


@pytest.mark.parametrize(
    ("subject", "body", "code"),
    [
        ("hub.query.services", b"{nope", "MALFORMED_JSON"),
        ("hub.query.services", b'{"name":"\xff\xfe\xfd"}', "MALFORMED_UTF8"),
        ("hub.query.service", b'{"service_name":"\xed\xa0\x80"}', "MALFORMED_UTF8"),
        ("hub.query.services", b"\xff\xfe\x00garbage", "MALFORMED_UTF8"),
        ("hub.query.services", b'{"name": 42}', "INVALID_REQUEST"),
        ("hub.query.services", b'{"nmae": "orders"}', "INVALID_REQUEST"),
        ("hub.query.services", b'{"name": "x; DROP TABLE service_registry"}', "INVALID_REQUEST"),
        ("hub.query.services", b'{"min_seq": -1}', "INVALID_REQUEST"),
        ("hub.query.service", b"{}", "INVALID_REQUEST"),
        ("hub.query.service", b'{"service_name": "nobody"}', "NOT_FOUND"),
        ("hub.query.nonsense", b"{}", "UNKNOWN_QUERY"),
        ("hub.query.services.evil", b"{}", "UNKNOWN_TENANT"),
        ("hub.query.services.Bad*", b"{}", "INVALID_TENANT"),
        ("hub.query.services", b'{"min_seq": 999999}', "NOT_YET_PROCESSED"),
        ("hub.query.services", b"x" * 70_000, "PAYLOAD_TOO_LARGE"),
    ],
)
async def test_malformed_queries_get_an_error_reply(start_hub, nc, subject, body, code):
    """Every malformed hub.query.* request gets a StandardResponse error with a code."""
    await start_hub(tenants=frozenset({"default"}), min_seq_wait_s=0.5)
    reply = await query(nc, subject, body)
    assert reply["success"] is False
    assert reply["error_code"] == code, reply
    assert reply["error_message"]
    assert reply["data"] is None
    # ... and the hub still answers a good one.
    assert (await query(nc, "hub.query.services", {}))["success"] is True


async def test_the_hub_survives_a_flood_of_garbage(start_hub, nc):
    """Hundreds of random bad messages, fire-and-forget, do not stop the hub; each is
    counted, and a valid registration sent after them is served."""
    hub = await start_hub()
    for i in range(300):
        await nc.publish("hub.register", bytes([i % 256]) * (i % 50))
        await nc.publish("hub.heartbeat", b'{"service_name": 1}')
    js = nc.jetstream()
    ack = await js.publish("hub.register", OK)
    reply = await query(nc, "hub.query.services", {"min_seq": ack.seq})
    assert [s["service_name"] for s in reply["data"]] == ["orders"]
    assert hub.metrics.get("ingress_rejected") == 600


async def test_something_that_is_not_an_event_in_the_log_is_skipped(
    start_hub, event_log_kind, hub_config, nc, pg, rds
):
    """Anyone allowed to publish on the log's subjects (or produce to its topic) can put
    something else there. The views keep following, a restarted hub folds the log, and
    replay and verify agree: the foreign records are left out, not fatal."""
    from aiokafka import AIOKafkaProducer

    from tests.integration.test_replay import live_traffic, replay_reproduces_the_views

    hub = await start_hub(event_log=event_log_kind, infra_self=False)
    first = await live_traffic(nc)
    await eventually(lambda: all(hub.progress.reflects(p.name, first) for p in hub.projections))
    garbage = [b"not json", b'{"type": "ServiceRegistered"}', b'{"type": "NoSuchEvent"}']
    if event_log_kind == "jetstream":
        for g in garbage:
            await nc.jetstream().publish("hub.log.default.ServiceRegistered", g)
    else:
        producer = AIOKafkaProducer(bootstrap_servers=",".join(hub_config.kafka_brokers))
        await producer.start()
        try:
            for i, g in enumerate(garbage):  # the topic is compacted: keys are required
                await producer.send_and_wait(hub_config.kafka_topic, g, key=b"foreign-%d" % i,
                                             partition=0)  # fmt: skip
        finally:
            await producer.stop()
    reg = {"service_name": "svc-after", "instance_id": "a-1", "host": "10.0.0.7", "port": 7}
    after = (await nc.jetstream().publish("hub.register", msgspec.json.encode(reg))).seq
    await eventually(
        lambda: all(hub.progress.reflects(p.name, after) for p in hub.projections), timeout=30
    )
    await hub.stop()

    again = await start_hub(event_log=event_log_kind, infra_self=False)  # the start-up fold
    reply = await query(nc, "hub.query.instances", {"service_name": "svc-after"})
    assert [i["instance_id"] for i in reply["data"]] == ["a-1"], reply
    await replay_reproduces_the_views(again, hub_config, pg, rds)
