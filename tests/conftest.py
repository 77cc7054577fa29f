"""Real servers for the test suite, from ``hub.stack`` (no Docker, nothing preinstalled).

Session-wide: PostgreSQL and Kafka (slow to start); each test gets its own database and
topic name on them. Per test: a fresh NATS (JetStream) and a fresh Valkey (fast to start).
"""

from __future__ import annotations

import os
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.stack import KafkaServer, KafkaUnavailable, NatsServer, PostgresServer, RedisServer


def _make_traversable(path: Path) -> None:
    """Let other users (PostgreSQL runs as ``nobody`` under root) reach ``path``.

    pytest creates its temporary directories 0700; only directories under the system
    temporary directory that we own are opened up (0755).
    """
    temp_root = Path(tempfile.gettempdir()).resolve()
    for directory in [path, *path.parents]:
        if directory == temp_root or temp_root not in directory.parents:
            break
        info = directory.stat()
        if info.st_uid == os.geteuid() and not info.st_mode & stat.S_IXOTH:
            directory.chmod(0o755)


@pytest.fixture(scope="session")
def stack_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's directory for server data (traversable by ``nobody``)."""
    root = tmp_path_factory.mktemp("stack").resolve()
    _make_traversable(root)
    return root


@pytest.fixture(scope="session")
def postgres_server(stack_root: Path) -> Iterator[PostgresServer]:
    """One PostgreSQL 16 for the whole session; tests use their own ``pg_database``."""
    with PostgresServer(stack_root / "postgres") as server:
        yield server


@pytest.fixture(scope="session")
def kafka_server(stack_root: Path) -> Iterator[KafkaServer]:
    """One single-node Kafka broker for the session; tests use their own ``kafka_topic``."""
    server = KafkaServer(stack_root / "kafka")
    try:
        server.start()
    except KafkaUnavailable as exc:
        pytest.fail(f"Kafka is needed by this test but cannot run here: {exc.reason}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh NATS server with JetStream (default max_payload) for this test only."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh Valkey (Redis protocol) server for this test only."""
    with RedisServer(tmp_path / "valkey") as server:
        yield server


@pytest.fixture
def pg_database(postgres_server: PostgresServer) -> Iterator[str]:
    """The name of a fresh, empty database on the session's PostgreSQL (dropped after)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(name)
    yield name
    postgres_server.drop_database(name)


@pytest.fixture
def kafka_topic() -> str:
    """A unique topic name for this test (not created: the broker auto-creates topics)."""
    return f"hub-events-{uuid.uuid4().hex[:8]}"
