"""The dev/test stack launcher: every server starts, answers a real client, and stops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import asyncpg
import nats
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from hub.stack import (
    EmbeddedStack,
    KafkaServer,
    KafkaUnavailable,
    NatsServer,
    PostgresServer,
    RedisServer,
    StackError,
)
from hub.stack import kafka as kafka_module
from hub.stack import postgres as postgres_module
from hub.stack._process import ManagedProcess, log_tail, port_is_free, process_alive
from tests.integration.conftest import ROOT

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="PostgreSQL runs as 'nobody' (through setpriv) only when root"
)


def assert_gone(server: ManagedProcess, pid: int) -> None:
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert port_is_free(server.port), f"{server.name} still listens on {server.port}"


async def test_nats_answers_core_and_jetstream(nats_server: NatsServer):
    """NATS starts with JetStream: core publish/subscribe round-trips and a stream stores a
    published message (the ack carries the stream and sequence 1)."""
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("stack.test")
        await nc.publish("stack.test", b"hello")
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"hello"

        js = nc.jetstream()
        await js.add_stream(name="STACKTEST", subjects=["stack.js.>"])
        ack = await js.publish("stack.js.one", b"stored")
        assert (ack.stream, ack.seq) == ("STACKTEST", 1)
        stored = await js.get_msg("STACKTEST", 1)
        assert stored.data == b"stored"
    finally:
        await nc.drain()


async def test_nats_max_payload_is_applied(tmp_path: Path):
    """``max_payload`` reaches the server: the client learns it from the INFO line."""
    with NatsServer(tmp_path / "nats", max_payload=64 * 1024) as server:
        nc = await nats.connect(server.url)
        try:
            assert nc.max_payload == 64 * 1024
        finally:
            await nc.close()


def test_nats_stops_and_frees_its_port(tmp_path: Path):
    """stop() ends the nats-server process, frees its port, and may be called twice."""
    server = NatsServer(tmp_path / "nats").start()
    pid = server.pid
    assert server.running and pid is not None
    server.stop()
    server.stop()
    assert_gone(server, pid)


async def test_postgres_serves_a_created_database(
    postgres_server: PostgresServer, pg_database: str
):
    """The session PostgreSQL accepts a connection to a freshly created database."""
    conn = await asyncpg.connect(postgres_server.dsn(pg_database))
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == pg_database
        assert (await conn.fetchval("SHOW server_version")).startswith("16")
    finally:
        await conn.close()


async def test_postgres_restarts_on_its_data_dir_and_stops(stack_root: Path):
    """A second start on the same data dir reuses the cluster (databases survive);
    stop() ends the postmaster and frees the port."""
    data_dir = stack_root / "postgres-lifecycle"
    with PostgresServer(data_dir) as server:
        server.create_database("kept")
    pid = server.pid
    assert pid is not None
    assert_gone(server, pid)

    with PostgresServer(data_dir) as again:
        conn = await asyncpg.connect(again.dsn())
        try:
            names = {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
        finally:
            await conn.close()
        assert "kept" in names
    assert again.pid is not None
    assert_gone(again, again.pid)


async def test_postgres_refuses_connections_without_its_password(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """A new cluster asks for its password (SCRAM): none, an empty or a wrong one is
    refused, the DSN's is accepted. The password lives in a file only its owner (this
    process's user) can read."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-such-pgpass"))  # nor ~/.pgpass
    info = postgres_server.password_path.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, os.geteuid())
    assert postgres_server.password
    assert postgres_server.password in postgres_server.dsn()
    for password in (None, "", "not-" + postgres_server.password):
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(
                host=postgres_server.host,
                port=postgres_server.port,
                user=postgres_server.user,
                password=password,
                database="postgres",
            )
    conn = await asyncpg.connect(postgres_server.dsn())
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_postgres_cluster_from_before_passwords_keeps_trust(stack_root: Path):
    """A cluster initialised before passwords (trust in pg_hba.conf, no password file)
    starts as it is: empty password, a DSN without one, connections accepted."""
    data_dir = stack_root / "postgres-trust"
    with PostgresServer(data_dir):
        pass
    # Turn it into what initdb --auth=trust made before, keeping the file's owner.
    hba = data_dir / "pgdata" / "pg_hba.conf"
    hba.write_text(hba.read_text().replace("scram-sha-256", "trust"))
    (data_dir / "password").unlink()
    with PostgresServer(data_dir) as server:
        assert server.password == ""
        assert server.dsn() == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        conn = await asyncpg.connect(server.dsn())
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()


def _status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict (Uid, CapEff, ...)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def private_folder(path: Path) -> Path:
    """``path`` created as a mode-0700 folder of root's (as root's home typically is)."""
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    assert path.stat().st_uid == 0
    return path


def copy_of_postgres(site: Path) -> Path:
    """pgserver's PostgreSQL (binaries, libraries, share files and the wheel's vendored
    libpq in ``pgserver.libs``) copied into ``site`` with the wheel's layout, as a clone's
    .venv has it; returns the copy's bin folder."""
    install = postgres_module.pg_bin_dir().parent
    copy = site / "pgserver" / "pginstall"
    (copy / "bin").mkdir(parents=True)
    for name in ("initdb", "postgres"):
        shutil.copy2(install / "bin" / name, copy / "bin" / name)
    for folder in ("lib", "share"):
        shutil.copytree(install / folder, copy / folder, symlinks=True)
    vendored = install.parents[1] / "pgserver.libs"  # the binaries' RPATH
    if vendored.is_dir():
        shutil.copytree(vendored, site / "pgserver.libs", symlinks=True)
    return copy / "bin"


@needs_root
async def test_postgres_runs_from_inside_a_private_root_folder(
    stack_root: Path, monkeypatch: pytest.MonkeyPatch
):
    """Under root, with the project cloned into a mode-0700 folder of root's (binaries,
    libraries and data folder all inside it), PostgreSQL starts as 'nobody', lent
    CAP_DAC_READ_SEARCH and nothing else, and answers SELECT 1 through its password DSN."""
    private = private_folder(stack_root / "private-0700")
    bin_dir = copy_of_postgres(private / "site-packages")
    monkeypatch.setattr(postgres_module, "pg_bin_dir", lambda: bin_dir)
    with PostgresServer(private / "postgres") as server:
        assert server.pid is not None
        assert os.readlink(f"/proc/{server.pid}/exe") == str(bin_dir / "postgres")
        status = _status(server.pid)
        assert status["Uid"].split()[0] == "65534", status  # nobody
        dac_read_search = 1 << 2
        caps = {key: int(status[key], 16) for key in ("CapEff", "CapPrm", "CapAmb")}
        assert set(caps.values()) == {dac_read_search}, caps
        conn = await asyncpg.connect(server.dsn())
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
        assert "invalid binary" not in server.log_path.read_text()


@needs_root
def test_without_the_capability_an_unreachable_folder_fails_in_one_line(stack_root: Path):
    """Root without CAP_DAC_READ_SEARCH (dropped from the bounding set, as in a default
    Docker container): binaries or a data folder inside a mode-0700 folder are refused
    before anything starts, in one line naming the folder and what to do (no loader
    error, no initdb)."""
    private = private_folder(stack_root / "private-nocap")
    bin_dir = copy_of_postgres(private / "site-packages")
    open_dir = stack_root / "open-nocap"  # traversable, as stack_root is
    open_bin_dir = copy_of_postgres(open_dir / "site-packages")
    script = textwrap.dedent(f"""
        from pathlib import Path
        import hub.stack.postgres as m
        from hub.stack import PostgresServer, StackError
        for bin_dir, data in (({str(bin_dir)!r}, {str(open_dir / "postgres")!r}),
                              ({str(open_bin_dir)!r}, {str(private / "postgres")!r})):
            m.pg_bin_dir = lambda: Path(bin_dir)
            try:
                PostgresServer(Path(data)).start()
            except StackError as exc:
                print("STACKERROR", exc)
            else:
                print("STARTED")
    """)
    done = subprocess.run(
        ["setpriv", "--bounding-set=-dac_read_search", sys.executable, "-c", script],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("STACKERROR")]
    assert len(lines) == 2, done.stdout + done.stderr
    binaries, data = lines
    assert f"the PostgreSQL binaries in {bin_dir}" in binaries
    assert f"{private} is not traversable by others" in binaries
    assert f"the data folder {private / 'postgres' / 'pgdata'}" in data
    assert f"{private} is not traversable by others" in data
    assert f"chmod o+x {private}" in data
    assert not (open_dir / "postgres" / "pgdata").exists()
    assert not (private / "postgres" / "pgdata").exists()


def test_postgres_starts_over_a_pid_file_naming_a_zombie(stack_root: Path):
    """A postmaster.pid left behind names a process that exited but was not reaped (a
    zombie, owned by the account PostgreSQL runs as): PostgreSQL alone would take it for a
    running postmaster and refuse to start; start() clears it and the cluster serves."""
    data_dir = stack_root / "postgres-zombie"
    with PostgresServer(data_dir):
        pass
    as_postgres = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    zombie = subprocess.Popen([*(as_postgres if os.geteuid() == 0 else []), "true"])
    try:
        deadline = time.monotonic() + 30
        while process_alive(zombie.pid):  # exited, not waited for: a zombie
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.05)
        assert Path(f"/proc/{zombie.pid}").exists()
        pid_file = data_dir / "pgdata" / "postmaster.pid"
        pid_file.write_text(f"{zombie.pid}\n{data_dir / 'pgdata'}\n")
        with PostgresServer(data_dir) as server:
            assert server.running
            assert int(pid_file.read_text().split()[0]) == server.pid
    finally:
        zombie.wait()


# A backend busy in a loop does not notice that its postmaster died: it keeps the cluster's
# shared memory attached until the loop ends, here when a file appears in the data folder.
BUSY_UNTIL_RELEASED = """
DO $$ BEGIN
    WHILE (pg_stat_file('release-shm', true)).size IS NULL LOOP END LOOP;
END $$
"""


async def test_postgres_killed_is_reaped_and_restarted_on_its_port(stack_root: Path):
    """SIGKILL to the postmaster: poll() reaps it (no zombie left) and reports -9;
    restart() clears the stale postmaster.pid, tries again while an old backend still
    holds the shared memory ("pre-existing shared memory block is still in use"), and
    serves the same cluster on the same port once that backend is gone."""
    with PostgresServer(stack_root / "postgres-restart") as server:
        server.create_database("kept")
        busy_conn = await asyncpg.connect(server.dsn())
        busy = asyncio.ensure_future(busy_conn.execute(BUSY_UNTIL_RELEASED))
        watcher = await asyncpg.connect(server.dsn())
        try:
            sql = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%release-shm%'"
            deadline = time.monotonic() + 30
            while (
                await watcher.fetchval(sql + " AND state = 'active' AND pid <> pg_backend_pid()")
                == 0
            ):
                assert time.monotonic() < deadline, "the busy backend did not start"
                await asyncio.sleep(0.05)
        finally:
            await watcher.close()
        pid, port = server.pid, server.port
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (code := server.poll()) is None:
            assert time.monotonic() < deadline, "postgres did not exit after SIGKILL"
            await asyncio.sleep(0.05)
        assert code == -signal.SIGKILL
        assert not process_alive(pid)
        assert (server.pgdata / "postmaster.pid").exists()  # stale: SIGKILL left it

        # Release the busy backend only once a restart was refused for its shared memory.
        refused = threading.Event()

        def release_after_refusal() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not refused.is_set():
                if "pre-existing shared memory block" in log_tail(server.log_path):
                    refused.set()
                time.sleep(0.01)
            (server.pgdata / "release-shm").write_text("")

        releaser = threading.Thread(target=release_after_refusal, daemon=True)
        releaser.start()
        server.restart()
        releaser.join(70)
        assert refused.is_set(), "no restart attempt was refused for the shared memory"
        assert server.running and server.pid != pid and server.port == port
        with contextlib.suppress(Exception):
            await asyncio.wait_for(busy, 10)
        busy_conn.terminate()
        conn = await asyncpg.connect(server.dsn("kept"))
        try:
            assert await conn.fetchval("SELECT current_database()") == "kept"
        finally:
            await conn.close()
        assert (server.log_path.parent / "postgres.log.1").exists()


def test_redis_answers_and_stops(redis_server: RedisServer):
    """Valkey answers PING/SET/GET over the Redis protocol; stop() frees its port."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.ping() is True
        assert client.set("stack:key", "value") is True
        assert client.get("stack:key") == b"value"
    finally:
        client.close()
    pid = redis_server.pid
    assert pid is not None
    redis_server.stop()
    assert_gone(redis_server, pid)


def test_early_exit_raises_stack_error_with_the_log(tmp_path: Path):
    """A server that dies while starting (its port is taken) raises StackError carrying
    the tail of its log, and leaves no process behind."""
    with RedisServer(tmp_path / "first") as first:
        second = RedisServer(tmp_path / "second", port=first.port)
        with pytest.raises(StackError, match="valkey on port") as failure:
            second.start(timeout=10)
        assert "Address already in use" in str(failure.value)
        assert not second.running


@pytest.mark.kafka
async def test_kafka_round_trips_a_message(kafka_server: KafkaServer, kafka_topic: str):
    """The broker auto-creates a new topic (6 partitions); a produced message is read back
    by a consumer from the earliest offset."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka_server.bootstrap)
    await producer.start()
    try:
        sent = await producer.send_and_wait(kafka_topic, b"payload", key=b"k")
        partitions = await producer.partitions_for(kafka_topic)
    finally:
        await producer.stop()
    assert len(partitions) == 6

    consumer = AIOKafkaConsumer(
        kafka_topic,
        bootstrap_servers=kafka_server.bootstrap,
        group_id=f"{kafka_topic}-reader",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=20)
    finally:
        await consumer.stop()
    assert (record.value, record.key) == (b"payload", b"k")
    assert (record.partition, record.offset) == (sent.partition, sent.offset)


@pytest.mark.kafka
def test_kafka_stops_and_frees_its_ports(stack_root: Path):
    """A dedicated broker starts and stop() ends the JVM, freeing both listener ports."""
    server = KafkaServer(stack_root / "kafka-lifecycle").start()
    pid = server.pid
    assert pid is not None
    server.stop()
    assert_gone(server, pid)
    assert port_is_free(server.controller_port)


async def test_embedded_stack_starts_describes_and_stops(stack_root: Path):
    """EmbeddedStack (without Kafka) starts NATS, PostgreSQL and Valkey, creates the hub's
    database, exports the hub's environment, lists three servers, and stop() leaves
    nothing running."""
    stack = EmbeddedStack(stack_root / "embedded").start()
    try:
        env = stack.env()
        assert set(env) == {
            "NATS_URL", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "POSTGRES_USER",
            "POSTGRES_PASSWORD", "DRAGONFLY_HOST", "DRAGONFLY_PORT", "DRAGONFLY_PASSWORD",
            "HUB_EVENT_LOG",
        }  # fmt: skip
        assert env["POSTGRES_DB"] == "central_hub"
        assert env["HUB_EVENT_LOG"] == "jetstream"
        assert env["NATS_URL"] == stack.nats.url
        assert stack.kafka is None
        assert len(stack.describe()) == 3

        assert env["POSTGRES_PASSWORD"] == stack.postgres.password != ""
        conn = await asyncpg.connect(
            host=env["POSTGRES_HOST"],
            port=int(env["POSTGRES_PORT"]),
            user=env["POSTGRES_USER"],
            password=env["POSTGRES_PASSWORD"],
            database=env["POSTGRES_DB"],
        )
        try:
            assert await conn.fetchval("SELECT current_database()") == "central_hub"
        finally:
            await conn.close()
        pids = [(server, server.pid) for server in stack.servers]
    finally:
        stack.stop()
    for server, pid in pids:
        assert pid is not None
        assert_gone(server, pid)


def test_kafka_unavailable_when_maven_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """When Maven cannot produce the jars, ensure_jars raises KafkaUnavailable whose reason
    carries Maven's output, and nothing is marked complete (the next run retries)."""
    broken = tmp_path / "pom.xml"
    broken.write_text("<project>this is not a pom")
    monkeypatch.setattr(kafka_module, "POM", broken)
    monkeypatch.setenv("HUB_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(KafkaUnavailable, match="Maven could not fetch") as failure:
        KafkaServer.ensure_jars()
    assert "pom.xml" in failure.value.reason
    assert not (tmp_path / "cache" / "kafka" / "libs" / ".complete").exists()


def test_kafka_unavailable_without_maven(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Without jars in the cache and no ``mvn`` on PATH, ensure_jars says so clearly."""
    monkeypatch.setenv("HUB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KafkaUnavailable, match="Maven"):
        KafkaServer.ensure_jars()
