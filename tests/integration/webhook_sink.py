"""A real HTTP server on 127.0.0.1 that plays a webhook receiver for the alert tests.

It records every request (when it came, on ``time.monotonic()``, its headers and JSON
body) and answers from a script, one entry per request in order, then 200: a status,
``(status, headers)``, or an ``asyncio.Event`` to hold the request until it is set (then
the next entry answers it), e.g. ``[500, 500, (429, {"Retry-After": "2"}), 200]``. One
request per connection (``Connection: close``), which every HTTP client handles.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"

Answer = int | tuple[int, dict[str, str]] | asyncio.Event


@dataclass(frozen=True)
class Received:
    """One request as the sink saw it: ``headers`` with lower-case names."""

    at: float  # time.monotonic() when its head had arrived
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the JSON body, decoded

    @property
    def notification_id(self) -> str:
        return str(self.body["notificationId"])


@dataclass
class WebhookSink:
    script: list[Answer] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)  # the status of each answer given
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)

    def url(self, path: str = "/hook") -> str:
        return f"http://{HOST}:{self.port}{path}"

    async def start(self) -> WebhookSink:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        pending = dict(self._handlers)
        for writer in pending.values():
            writer.close()
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=5)
            for task in stuck:
                task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            at = time.monotonic()
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {}
            for line in lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            data = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(Received(at, method, path, headers, json.loads(data or b"null")))
            status, extra = await self._answer()
            writer.write(_response(status, extra))
            await writer.drain()
            self.answered.append(status)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._handlers.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _answer(self) -> tuple[int, dict[str, str]]:
        while self.script:
            step = self.script.pop(0)
            if isinstance(step, asyncio.Event):
                await step.wait()
                continue
            if isinstance(step, int):
                return step, {}
            return step
        return 200, {}


def _response(status: int, headers: dict[str, str]) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Whatever"
    body = b'{"ok": true}' if 200 <= status < 300 else b'{"error": "scripted"}'
    lines = [f"HTTP/1.1 {status} {phrase}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += ["Content-Type: application/json", "Connection: close", "", ""]
    return "\r\n".join(lines).encode() + body


@contextlib.asynccontextmanager
async def serve_webhook(script: Iterable[Answer] = ()) -> AsyncIterator[WebhookSink]:
    sink = await WebhookSink(script=list(script)).start()
    try:
        yield sink
    finally:
        await sink.close()
