"""A bug in the hub's own code on one message does not wedge the stream, and a task that
keeps failing ends the hub with a non-zero code instead of hanging.

The bugs are injected into the running hub (a function the ingest path calls replaced by
one that raises for one message); everything else, servers included, is real.
"""

from __future__ import annotations

import msgspec
import pytest

from events import translate as translate_module
from handlers import core as core_module
from hub import app as app_module
from hub import ingest as ingest_module
from hub.app import EXIT_GAVE_UP
from tests.integration.conftest import eventually, query


def registration(name: str) -> bytes:
    return msgspec.json.encode(
        {"service_name": name, "instance_id": f"{name}-1", "host": "10.0.0.3", "port": 3}
    )


async def dead_letters(nc, count: int) -> dict[int, object]:
    """The first ``count`` dead letters on hub.dlq, by ingress sequence."""
    sub = await nc.jetstream().subscribe("hub.dlq", stream="HUB_DLQ", ordered_consumer=True)
    try:
        out = {}
        for _ in range(count):
            m = await sub.next_msg(timeout=60)
            out[int(m.headers["Hub-Ingress-Seq"])] = m
        return out
    finally:
        await sub.unsubscribe()


async def test_a_message_the_hub_keeps_failing_on_is_dead_lettered_after_max_deliver(
    start_hub, nc, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
):
    """Folding one message's event raises every time (a bug past the decision): its batch
    is not recorded, the ingest loop restarts from the log and tries the batch's messages
    one at a time; once the hub has failed on that one message HUB_MAX_DELIVER times on
    its own it is dead-lettered with INTERNAL_ERROR and logged, and everything around it
    is recorded. A bug in parsing one message rejects just that one at once."""
    hub = await start_hub(max_deliver=3)
    evolve = core_module.evolve

    def failing_evolve(state, event):
        if getattr(event, "service_name", "") == "boom":
            raise RuntimeError("injected bug")
        return evolve(state, event)

    parse = translate_module.parse_ingress

    def failing_parse(kind, payload, **kw):
        if b"parse-bug" in payload:
            raise KeyError("injected bug")
        return parse(kind, payload, **kw)

    monkeypatch.setattr(core_module, "evolve", failing_evolve)
    monkeypatch.setattr(translate_module, "parse_ingress", failing_parse)
    js = nc.jetstream()
    before = (await js.publish("hub.register", registration("fine-before"))).seq
    boom = (await js.publish("hub.register", registration("boom"))).seq
    bug = (await js.publish("hub.register", registration("parse-bug"))).seq
    after = (await js.publish("hub.register", registration("fine-after"))).seq

    letters = await dead_letters(nc, 2)
    assert set(letters) == {boom, bug}
    assert letters[boom].headers["Hub-Reason-Code"] == "INTERNAL_ERROR"
    assert "failed on this message 3 times" in letters[boom].headers["Hub-Reason"]
    assert letters[bug].headers["Hub-Reason-Code"] == "INTERNAL_ERROR"
    assert "KeyError" in letters[bug].headers["Hub-Reason"]
    for name, seq in (("fine-before", before), ("fine-after", after)):
        reply = await query(nc, "hub.query.services", {"name": name, "min_seq": seq})
        assert [s["service_name"] for s in reply["data"]] == [name], reply
    reply = await query(nc, "hub.query.services", {"name": "boom", "min_seq": after})
    assert reply["data"] == []
    # Its batch failed once, then it failed alone 3 times; the 4th time it was set aside.
    assert hub.status.restarts["ingest"] == 4
    assert hub.exit_code == 0 and not hub._stop.is_set()
    logged = capfd.readouterr()
    assert "ingress_message_quarantined" in logged.out + logged.err
    assert "ingress_message_failed" in logged.out + logged.err


async def test_a_task_that_keeps_failing_stops_the_hub_with_exit_code_1(
    start_hub, nc, monkeypatch: pytest.MonkeyPatch
):
    """Every batch fails (a bug in the loop itself): the loop is restarted with backoff,
    and after more failures than its restart intensity allows the hub stops by itself
    with EXIT_GAVE_UP, the reason naming the task, instead of running without ingest."""
    monkeypatch.setattr(app_module, "RESTART_FIRST_DELAY_S", 0.05)
    monkeypatch.setattr(app_module, "RESTART_MAX_DELAY_S", 0.2)
    hub = await start_hub()

    async def always_failing(self, msgs):
        raise RuntimeError("injected: the loop cannot process anything")

    monkeypatch.setattr(ingest_module.Ingest, "process", always_failing)
    await nc.jetstream().publish("hub.register", registration("never"))
    await eventually(lambda: hub._stop.is_set(), timeout=120, interval=0.5)
    assert hub.exit_code == EXIT_GAVE_UP
    limit = hub.config.max_deliver + 5
    assert f"ingest failed {limit + 1} times" in hub.exit_reason
    assert hub.status.restarts["ingest"] == limit + 1
