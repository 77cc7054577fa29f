"""The hub's NATS connections: nats-py's client, made safe against hostile subjects.

nats-py decodes every delivered message's subject and reply subject as strict
UTF-8 inside its read loop. nats-server accepts any bytes but whitespace in a
subject, so one message published on, say, ``hub.register.\\xff`` made the
decode raise there: the read loop died, the connection looked connected and
never read again. The ingress consumer met such a message again after every
restart. Here a subject that is not UTF-8 is decoded with its bad bytes escaped
(``\\xff``): it is then an invalid tenant, rejected like any other. The same holds
for a header block whose inline status line is not UTF-8 (``NATS/1.0 \\xff``),
which nats-py also decodes strictly in its read loop.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg


class HubClient(Client):
    """nats-py's ``Client`` whose read loop survives a subject or header that is not UTF-8."""

    async def _process_headers(self, headers: bytes) -> dict[str, str] | None:
        try:
            return await super()._process_headers(headers)
        except UnicodeDecodeError:
            escaped = headers.decode(errors="backslashreplace").encode()
            return await super()._process_headers(escaped)

    def _build_message(
        self,
        sid: int,
        subject: bytes,
        reply: bytes,
        data: bytes,
        headers: dict[str, str] | None,
    ) -> Msg:
        try:
            return super()._build_message(sid, subject, reply, data, headers)  # type: ignore[no-any-return]
        except UnicodeDecodeError:
            return super()._build_message(  # type: ignore[no-any-return]
                sid,
                subject.decode(errors="backslashreplace").encode(),
                reply.decode(errors="backslashreplace").encode(),
                data,
                headers,
            )


async def connect(servers: list[str], **options: Any) -> HubClient:
    """A connected :class:`HubClient` (the options of ``nats.connect``)."""
    nc = HubClient()
    await nc.connect(servers=servers, **options)
    return nc
