"""One writer per ingress stream: a second `hub run` waits as a standby and takes over when
the first stops or dies; a hub that lost the writer role (paused past its lease while the
standby took over) exits non-zero with a clear line; the consumer deleted under a hub is
made again, replaced under it fences it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator

import msgspec
import nats.errors
import pytest

from tests.integration.conftest import HubProcess, eventually, query

LEASE_S = 2.0


async def register(nc, name: str) -> int:
    body = {"service_name": name, "instance_id": f"{name}-1", "host": "10.0.0.9", "port": 9}
    return (await nc.jetstream().publish("hub.register", msgspec.json.encode(body))).seq


async def served(nc, name: str, seq: int) -> bool:
    """Whether a hub answers with ``name`` registered (read-your-writes on ``seq``); a
    frozen hub in the query group may swallow a request, so time out quickly and retry."""
    try:
        reply = await query(nc, "hub.query.services", {"name": name, "min_seq": seq}, timeout=2)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return False
    return bool(reply["success"]) and [s["service_name"] for s in reply["data"]] == [name]


async def consumed(nc, name: str, *, timeout: float) -> None:
    """Register ``name``, then wait until a hub answers with it: ingress is consumed."""
    seq = await register(nc, name)
    await eventually(lambda: served(nc, name, seq), timeout=timeout)


def said(hub: HubProcess, text: str) -> bool:
    return text in hub.tail()


@contextlib.asynccontextmanager
async def writer_and_standby(
    hub_config, nc, tmp_path, names: tuple[str, str]
) -> AsyncIterator[tuple[HubProcess, HubProcess]]:
    """Two `hub run` processes on the same servers (lease LEASE_S): the first serving,
    the second saying it waits as a standby. Both stopped at the end."""
    config = dataclasses.replace(hub_config, writer_lease_s=LEASE_S)
    writer, standby = (HubProcess(config, tmp_path / f"{name}.log") for name in names)
    writer.start()
    try:
        await eventually(lambda: _answers(nc), timeout=60)
        standby.start()
        await eventually(lambda: said(standby, "waiting as a standby"), timeout=60)
        yield writer, standby
    finally:
        writer.stop()
        standby.stop()


async def test_a_second_hub_waits_as_a_standby_and_takes_over(hub_config, nc, tmp_path):
    """A second `hub run` against a running one says it waits as a standby and consumes
    nothing; stopping the first hands over at once; the first, started again, waits in
    turn, and takes over within the lease when the second is SIGKILLed. Ingress keeps
    being consumed throughout."""
    async with writer_and_standby(hub_config, nc, tmp_path, ("first", "second")) as (
        first,
        second,
    ):
        assert "another hub is the writer of this ingress" in second.tail()
        await consumed(nc, "while-both", timeout=30)
        assert not said(second, "the writer lease is ours now")

        first.stop()  # SIGTERM: it releases the lease
        assert first.proc.returncode == 0, first.tail()
        await eventually(lambda: said(second, "the writer lease is ours now"), timeout=30)
        await consumed(nc, "after-first-stopped", timeout=30)

        first.start()  # now the standby
        await eventually(lambda: said(first, "waiting as a standby"), timeout=60)
        second.kill()  # no release: the lease must run out
        await consumed(nc, "after-second-killed", timeout=60)
        assert said(first, "the writer lease is ours now")


async def test_a_hub_paused_past_its_lease_is_fenced_and_exits_3(
    hub_config, nc, tmp_path, event_log_kind
):
    """The writer is paused (SIGSTOP) past its lease while a standby waits: the standby
    takes over and serves. Continued, the old writer must not write: it exits with code 3
    and one line saying it was fenced, and the new writer keeps consuming ingress."""
    assert hub_config.event_log == event_log_kind
    async with writer_and_standby(hub_config, nc, tmp_path, ("old", "new")) as (old, new):
        await consumed(nc, "before-pause", timeout=30)

        os.kill(old.proc.pid, signal.SIGSTOP)
        try:
            await eventually(lambda: said(new, "the writer lease is ours now"), timeout=60)
            await consumed(nc, "while-paused", timeout=60)
        finally:
            os.kill(old.proc.pid, signal.SIGCONT)
        await eventually(lambda: old.proc.poll() is not None, timeout=60)
        assert old.proc.returncode == 3, old.tail()
        assert "hub: fenced: " in old.tail() and "(exit 3)" in old.tail()

        await consumed(nc, "after-fence", timeout=30)
        assert new.proc.poll() is None, new.tail()


async def test_a_deleted_consumer_is_made_again_and_a_replaced_one_fences(start_hub, nc):
    """Someone deletes the hub's durable ingress consumer: the hub makes it again and keeps
    consuming. Someone replaces it (deletes and creates their own, as a second hub that
    ignored the lease would): the hub stops, fenced (exit code 3, reason named)."""
    from hub.app import EXIT_FENCED
    from hub.ingest import ingress_consumer_config

    hub = await start_hub(writer_lease_s=LEASE_S)
    js = nc.jetstream()
    await js.delete_consumer("HUB_INGRESS", "hub-ingest")
    await eventually(lambda: hub.metrics.get("ingress_consumer_recreated") >= 1, timeout=30)
    await consumed(nc, "after-delete", timeout=30)
    assert hub.exit_code == 0

    await js.delete_consumer("HUB_INGRESS", "hub-ingest")
    await js.add_consumer("HUB_INGRESS", ingress_consumer_config())
    await eventually(lambda: hub._stop.is_set(), timeout=30)
    assert hub.exit_code == EXIT_FENCED
    assert "replaced" in hub.exit_reason


async def _answers(nc) -> bool:
    try:
        return bool((await query(nc, "hub.query.services", {}, timeout=1))["success"])
    except Exception:
        return False


async def test_a_lease_renewal_decides_from_what_the_bucket_holds(nc):
    """The lease's compare-and-set, on a real NATS KV bucket: a renewal of ours that
    landed although its answer was lost is adopted; an entry that expired untouched is
    taken again; another hub's entry, or a bucket written since ours expired, fences."""
    import msgspec as _msgspec

    from hub.writer import KEY, Fenced, WriterLease

    ours = WriterLease(nc, lease_s=1.0)
    assert await ours.try_acquire() and ours.valid()
    other = WriterLease(nc, lease_s=1.0)
    assert not await other.try_acquire()  # one writer at a time
    kv = await nc.jetstream().key_value("HUB_WRITER")

    # A renewal that landed late: the bucket holds our id at a revision we do not know.
    await kv.update(KEY, _msgspec.json.encode(ours.me), last=ours._revision)
    await ours.renew()
    assert ours.valid()

    # Expired untouched (not renewed for the lease): taken again.
    await eventually(lambda: _gone(kv), timeout=30)
    await ours.renew()
    assert ours.valid()

    # Expired, then another hub was the writer for a while (and left): fenced.
    await eventually(lambda: _gone(kv), timeout=30)
    assert await other.try_acquire()
    await other.release()
    with pytest.raises(Fenced, match="written since"):
        await ours.renew()
    assert not ours.valid()

    # Another hub holds it now: fenced, naming it.
    late = WriterLease(nc, lease_s=1.0)
    assert await late.try_acquire()
    with pytest.raises(Fenced, match=late.me.id):
        await other.renew()


async def _gone(kv) -> bool:
    import nats.js.errors

    try:
        await kv.get("ingress")
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return True
    return False


async def test_appends_wait_while_the_lease_is_lapsed_and_the_hub_says_so(start_hub, nc):
    """Not renewed for a whole lease (as after a NATS outage), the writer appends nothing
    and reports its log as stalled; renewed, it records what waited and is HEALTHY again
    (the stall it reported is cleared, not left behind)."""
    hub = await start_hub(writer_lease_s=5.0)
    hub.lease._valid_until = 0.0  # lapsed: the next renewal (within 1 s) restores it
    seq = await register(nc, "during-the-lapse")
    await eventually(lambda: hub.status.log_stalled_since is not None, timeout=30)
    assert "writer lease" in (hub.status.log_error or "")
    await eventually(lambda: served(nc, "during-the-lapse", seq), timeout=30)
    await eventually(lambda: hub.status.status == "HEALTHY", timeout=30)
    reply = await query(nc, "hub.query.status", {})
    assert reply["data"]["status"] == "HEALTHY", reply
