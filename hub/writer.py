"""One writer per ingress stream: a lease in NATS KV that a second hub cannot take.

The hub decides from its in-memory state, so two hubs consuming one ingress
stream would decide from two different states and both write the log. Before
it consumes anything, a hub takes the lease: key ``ingress`` of the KV bucket
``HUB_WRITER``, created only if absent (compare-and-set on its revision). The
bucket's TTL is the lease: the holder renews the entry every ``lease_s / 5``;
an entry not renewed for ``lease_s`` expires, and a waiting hub (a standby)
creates it. A hub that stops releases it (deletes it), so a standby takes over
at once.

A holder that cannot renew for ``lease_s`` (NATS unreachable, the process
paused) no longer counts as the writer: ``valid()`` is False and the hub does
not append. When it can renew again it keeps the lease only if nobody has
written the bucket since its own last write (its stream's last sequence is still
its revision); otherwise another hub has been the writer meanwhile, its state
is stale, and :class:`Fenced` is raised: the hub stops, loudly, and its
supervisor restarts it (as a standby, since the other hub holds the lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

log = structlog.get_logger(__name__)

BUCKET = "HUB_WRITER"
KEY = "ingress"


class Fenced(Exception):
    """This hub is no longer the writer (another hub took over); it must stop."""


class Holder(msgspec.Struct, frozen=True):
    """Who holds the lease (the value of the KV entry)."""

    id: str
    host: str
    pid: int
    since: float

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))
        return f"hub {self.id} (host {self.host}, pid {self.pid}, writer since {started})"


class WriterLease:
    """The ingress writer's lease (see the module docstring)."""

    def __init__(
        self,
        nc: Client,
        *,
        lease_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nc = nc
        self.lease_s = lease_s
        self._monotonic = monotonic
        self.me = Holder(id=uuid.uuid4().hex[:12], host=socket.gethostname(), pid=os.getpid(),
                         since=time.time())  # fmt: skip
        self._kv: KeyValue | None = None
        self._revision = 0
        self._valid_until = 0.0
        self._released = False

    @property
    def renew_every(self) -> float:
        return self.lease_s / 5

    def valid(self) -> bool:
        """Whether this hub is the writer now (renewed within the last ``lease_s``)."""
        return self._revision > 0 and not self._released and self._monotonic() < self._valid_until

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            js = self._nc.jetstream()
            config = KeyValueConfig(bucket=BUCKET, history=1, ttl=self.lease_s)
            try:
                self._kv = await js.create_key_value(config)
            except nats.js.errors.BadRequestError:  # it exists with another TTL: ours wins
                stream = (await js.stream_info(f"KV_{BUCKET}")).config
                stream.max_age = self.lease_s
                await js.update_stream(stream)
                self._kv = await js.key_value(BUCKET)
        return self._kv

    async def holder(self) -> Holder | None:
        """Who holds the lease now (None: nobody)."""
        kv = await self._bucket()
        try:
            entry = await kv.get(KEY)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return _decode_holder(entry.value)

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; False if another hub does."""
        kv = await self._bucket()
        started = self._monotonic()
        try:
            self._revision = await kv.create(KEY, msgspec.json.encode(self.me))
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        self._valid_until = started + self.lease_s
        self._released = False
        log.info("writer_lease_acquired", holder=self.me.describe(), lease_s=self.lease_s)
        return True

    async def acquire(self, on_standby: Callable[[Holder | None], None]) -> None:
        """Wait until this hub holds the lease; ``on_standby(holder)`` is called whenever
        another holder is seen (the first time, and when it changes)."""
        seen: Holder | None = None
        while not await self.try_acquire():
            holder = await self.holder()
            if holder != seen:
                seen = holder
                on_standby(holder)
            await asyncio.sleep(self.renew_every)

    async def renew(self) -> None:
        """Renew the lease.

        A renewal whose answer was lost (NATS went away meanwhile) may still land later,
        so a refused renewal looks at the entry: ours (our id) is adopted with its
        revision; another hub's fences this one; none (expired) is taken again only if
        nothing was written to the bucket since our last known write.

        Raises:
            Fenced: another hub has written the lease since this one last did.
            Exception: NATS errors (the caller retries; the lease lapses meanwhile).
        """
        if not self._nc.is_connected:  # a request now would be sent later, if ever
            raise ConnectionError("NATS is not connected")
        kv = await self._bucket()
        started = self._monotonic()
        value = msgspec.json.encode(self.me)
        try:
            self._revision = await kv.update(KEY, value, last=self._revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            self._revision = await self._reclaim(kv, value)
        self._valid_until = started + self.lease_s

    async def _reclaim(self, kv: KeyValue, value: bytes) -> int:
        """After a refused renewal: this hub's revision again, or ``Fenced``."""
        try:
            entry = await kv.get(KEY)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            entry = None
        if entry is not None:
            holder = _decode_holder(entry.value)
            if holder.id == self.me.id and entry.revision is not None:
                log.info("writer_lease_renewal_landed_late", revision=entry.revision)
                return int(entry.revision)
            self._valid_until = 0.0  # not the writer: nothing more is appended
            raise Fenced(f"the writer lease was taken over by {holder.describe()}")
        info = await self._nc.jetstream().stream_info(f"KV_{BUCKET}")
        if info.state.last_seq != self._revision:
            self._valid_until = 0.0
            raise Fenced(
                "the writer lease expired and was written since (another hub was the "
                "writer meanwhile)"
            )
        revision = int(await kv.create(KEY, value))
        log.warning("writer_lease_expired_retaken", revision=revision)
        return revision

    async def keep(
        self, stop: asyncio.Event, also: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Renew every ``renew_every`` seconds until ``stop`` is set; ``also`` is a check
        run after each renewal (it may raise ``Fenced`` too).

        Raises:
            Fenced: see ``renew``.
        """
        while not stop.is_set():
            try:
                await asyncio.wait_for(self.renew(), self.lease_s / 2)
                if also is not None:
                    await asyncio.wait_for(also(), self.lease_s / 2)
            except Fenced:
                raise
            except (Exception, TimeoutError) as exc:  # NATS away: keep trying, it lapses
                log.warning("writer_lease_renew_failed", error=repr(exc),
                            valid=self.valid())  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.renew_every)

    async def release(self) -> None:
        """Give the lease up (a standby takes over at once); best effort."""
        if self._revision <= 0 or self._released:
            return
        self._released = True
        try:
            kv = await self._bucket()
            await asyncio.wait_for(kv.delete(KEY, last=self._revision), 2)
            log.info("writer_lease_released")
        except (Exception, TimeoutError) as exc:  # it expires by itself within lease_s
            log.info("writer_lease_release_failed", error=repr(exc))


def _decode_holder(value: bytes | None) -> Holder:
    try:
        return msgspec.json.decode(value or b"", type=Holder)
    except msgspec.DecodeError:
        return Holder(id="?", host="?", pid=0, since=0.0)


__all__ = ["BUCKET", "KEY", "Fenced", "Holder", "WriterLease"]
