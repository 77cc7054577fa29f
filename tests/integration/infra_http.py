"""Small real servers on 127.0.0.1 for the infrastructure checks' tests.

``StubHttpServer`` speaks just enough HTTP/1.1 (one request per connection) to answer
with a chosen status and body, after a delay, once a gate opens, or never;
``silent_server`` accepts connections and says nothing, which is what a hung server
looks like to any client.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Reply:
    """What the stub answers: ``hang`` keeps the connection open without a response;
    ``gate`` holds the answer until the event is set."""

    status: int = 200
    body: bytes = b'{"status": "ok"}'
    delay: float = 0.0
    hang: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    gate: asyncio.Event | None = None


@dataclass
class StubHttpServer:
    """Answers ``routes[path]`` or else ``reply``; records the path of every request."""

    reply: Reply = field(default_factory=Reply)
    routes: dict[str, Reply] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    requested: asyncio.Event = field(default_factory=asyncio.Event)  # set by each request
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)

    def url(self, path: str = "/") -> str:
        return f"http://{HOST}:{self.port}{path}"

    async def start(self) -> StubHttpServer:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await _end(self._handlers)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            self.requests.append(path)
            self.requested.set()
            reply = self.routes.get(path, self.reply)
            if reply.hang:
                await reader.read()  # until the client gives up
                return
            if reply.gate is not None:
                await reply.gate.wait()
            await asyncio.sleep(reply.delay)
            writer.write(_response(reply))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._handlers.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()


def _response(reply: Reply) -> bytes:
    try:
        phrase = http.HTTPStatus(reply.status).phrase
    except ValueError:
        phrase = "Whatever"
    lines = [f"HTTP/1.1 {reply.status} {phrase}", f"Content-Length: {len(reply.body)}"]
    lines += [f"{name}: {value}" for name, value in reply.headers]
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode() + reply.body


@contextlib.asynccontextmanager
async def serve_http(reply: Reply | None = None) -> AsyncIterator[StubHttpServer]:
    server = await StubHttpServer(reply=reply or Reply()).start()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A port that accepts connections and never writes a byte (yields the port)."""
    handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers[task] = writer
        try:
            while await reader.read(4096):
                pass
        except ConnectionError:
            pass
        finally:
            handlers.pop(task, None)
            writer.close()

    server = await asyncio.start_server(swallow, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await _end(handlers)


async def _end(handlers: dict[asyncio.Task[None], asyncio.StreamWriter]) -> None:
    """Close the open connections so that their handlers return by themselves.

    Cancelling a handler task instead makes asyncio 3.11 log an error from its
    connection callback (it asks a cancelled task for its exception).
    """
    pending = dict(handlers)
    for writer in pending.values():
        writer.close()
    if pending:
        _, stuck = await asyncio.wait(pending, timeout=5)
        for task in stuck:
            task.cancel()
