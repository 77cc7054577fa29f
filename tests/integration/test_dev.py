"""`hub dev` brings up the embedded stack and the hub, says where, keeps them up (a server
or the hub that dies is started again) and Ctrl-C stops all."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import asyncpg
import msgspec
import nats
import nats.errors

from hub.stack.dev import Backoff
from tests.integration.conftest import (
    ROOT,
    alive,
    child_running,
    eventually,
    query,
    query_all,
    reaped,
)

# Where each server listens, in the table `hub dev` prints (the DSN carries a password).
PORT = r"(?:nats|postgresql|redis)://(?:[^@\s]*@)?127\.0\.0\.1:(\d+)"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_hub_dev_serves_and_ctrl_c_stops_everything(stack_root):
    """`hub dev` prints where NATS, PostgreSQL and the Redis-protocol server listen,
    serves a registration end to end, and on SIGINT (Ctrl-C) exits 0 with every
    server stopped."""
    # The data folder must be reachable by 'nobody', who runs PostgreSQL when we are root.
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child that outlives the test's awaits
        [sys.executable, "-m", "hub", "dev", "--data", str(stack_root / "hub-dev")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while not any("hub running" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
        out = "".join(lines)
        nats_url = re.search(r"NATS \+ JetStream\s+(nats://127\.0\.0\.1:\d+)", out).group(1)
        table = "".join(line for line in lines if line.startswith("  "))
        ports = [int(p) for p in re.findall(PORT, table)]
        assert len(ports) == 3, out
        assert re.search(r"event log\s+jetstream", out)
        assert all(_listening(p) for p in ports)

        nc = await nats.connect(nats_url)
        ack = await nc.jetstream().publish(
            "hub.register", msgspec.json.encode({"service_name": "orders", "host": "h", "port": 1})
        )
        reply = await query(nc, "hub.query.services", {"min_seq": ack.seq})
        assert [s["service_name"] for s in reply["data"]] == ["orders"]
        await nc.close()

        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + rest
    assert "hub dev: stopped" in rest
    assert not any(_listening(p) for p in ports)


# --- supervision ------------------------------------------------------------------------------


class DevOutput:
    """``hub dev``'s output, read by a thread (the pipe must never fill up)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        self._stream = proc.stdout
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def count(self, needle: str) -> int:
        return sum(needle in line for line in list(self.lines))

    def close(self) -> None:
        self._thread.join(10)
        self._stream.close()


HUB_RUN = "-m hub run"
VIEWS = "hub.views_process"
QUERY_SERVER = "hub.query_server"


async def test_hub_dev_restarts_what_dies_and_loses_nothing(stack_root):
    """Under `hub dev`, SIGKILL to the views process, to the PostgreSQL postmaster, to the
    Redis-protocol server (restarted empty: the view heals itself), to a query server and
    to the hub child: each comes back by itself (a new, live pid; the dead one reaped),
    and every registration that got a PubAck (before, and while each was down) ends up in
    PostgreSQL's service_registry and in hub.query.services at the last PubAck's
    sequence. Ctrl-C then stops everything as before."""
    data = stack_root / "hub-dev-supervised"
    env = {**os.environ, "HUB_WRITER_LEASE_S": "2"}  # a restarted hub's standby wait
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child that outlives the test's awaits
        [sys.executable, "-m", "hub", "dev", "--data", str(data)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out = DevOutput(proc)
    nc = None
    sent: list[str] = []
    last_seq = 0

    async def register(prefix: str, n: int = 3) -> None:
        nonlocal last_seq
        js = nc.jetstream()
        for k in range(1, n + 1):
            body = {"service_name": f"svc-{prefix}", "instance_id": f"{prefix}-{k}",
                    "host": "h", "port": k}  # fmt: skip
            ack = await js.publish("hub.register", msgspec.json.encode(body), timeout=10)
            last_seq = max(last_seq, ack.seq)
            sent.append(f"{prefix}-{k}")

    async def in_postgres() -> set[str]:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            rows = await conn.fetch("SELECT instance_id FROM service_registry")
        finally:
            await conn.close()
        return {r["instance_id"] for r in rows}

    missing: dict[str, object] = {}  # what the last look found missing, for a failure

    async def everything_kept() -> bool:
        """Every PubAck'd registration is in PostgreSQL and answered at the last seq."""
        missing.clear()
        try:
            missing["postgres"] = sorted(set(sent) - await in_postgres())
            if missing["postgres"]:
                return False
            pairs = await query_all(nc, "hub.query.services", {"min_seq": last_seq})
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, nats.errors.Error,
                AssertionError) as exc:  # fmt: skip
            missing["error"] = repr(exc)[:300]
            return False  # a server or the hub is still coming back
        missing["query"] = sorted(set(sent) - {p["instance_id"] for p in pairs})
        return not missing["query"]

    def fail_text() -> str:
        return out.text()[-6000:]

    async def until(what: str, check, timeout: float):
        try:
            return await eventually(check, timeout=timeout)
        except AssertionError:
            raise AssertionError(
                f"not within {timeout} s: {what} (last seen missing: {missing}, "
                f"last seq {last_seq})\n{fail_text()}"
            ) from None

    try:
        await eventually(lambda: out.count("hub running") or proc.poll() is not None,
                         timeout=90)  # fmt: skip
        assert proc.poll() is None, fail_text()
        text = out.text()
        nats_url = re.search(r"NATS \+ JetStream\s+(nats://127\.0\.0\.1:\d+)", text).group(1)
        dsn = re.search(r"PostgreSQL 16\s+(postgresql://\S+)", text).group(1)
        table = "".join(line for line in out.lines if line.startswith("  "))
        ports = [int(p) for p in re.findall(PORT, table)]
        assert len(ports) == 3, text
        password = (data / "postgres" / "password").read_text().strip()
        assert f"postgres:{password}@" in dsn
        nc = await nats.connect(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)

        await register("before")
        await until("every PubAck'd registration kept", everything_kept, 60)

        # 1. The views process (a child of the hub child): the hub starts another one.
        hub = child_running(proc.pid, HUB_RUN)
        assert hub is not None, fail_text()
        views = child_running(hub, VIEWS)
        assert views is not None, fail_text()
        os.kill(views, signal.SIGKILL)
        await register("views-down")
        await until("the views process exits", lambda: not alive(views), 30)
        new_views = await until("a new views process", lambda: child_running(hub, VIEWS), 60)
        assert new_views != views and alive(new_views)
        await until("every PubAck'd registration kept", everything_kept, 60)

        # 2. The PostgreSQL postmaster (a child of dev): dev reaps it and starts it again.
        pid_file = data / "postgres" / "pgdata" / "postmaster.pid"
        postmaster = int(pid_file.read_text().split()[0])
        assert alive(postmaster)
        os.kill(postmaster, signal.SIGKILL)
        await register("postgres-down")
        await until("dev reports postgres", lambda: out.count("postgres exited with code -9"), 30)
        await until("the postmaster reaped", lambda: reaped(postmaster), 30)

        def new_postmaster() -> int | None:
            try:
                pid = int(pid_file.read_text().split()[0])
            except (FileNotFoundError, ValueError, IndexError):
                return None
            return pid if pid != postmaster and alive(pid) else None

        postmaster = await until("a new postmaster", new_postmaster, 60)
        await until("every PubAck'd registration kept", everything_kept, 90)

        # 3. The Redis-protocol server (a child of dev, memory only): dev starts it again,
        # empty; the hub's projector notices the lost view and rebuilds it from the log.
        valkey = child_running(proc.pid, "valkey-server")
        assert valkey is not None, fail_text()
        os.kill(valkey, signal.SIGKILL)
        await register("redis-down")
        await until("dev reports valkey", lambda: out.count("valkey exited with code -9"), 30)
        await until("the valkey server reaped", lambda: reaped(valkey), 30)
        new_valkey = await until(
            "a new valkey server", lambda: child_running(proc.pid, "valkey-server"), 60
        )
        assert new_valkey != valkey
        await until("every PubAck'd registration kept", everything_kept, 90)
        views_status = (await query(nc, "hub.query.status", {}))["data"]["views"]
        assert views_status["redis-registry"]["rebuilt"] >= 1, views_status

        # 4. A query server (a child of the hub child): the hub starts another one.
        server = child_running(hub, QUERY_SERVER)
        assert server is not None, fail_text()
        os.kill(server, signal.SIGKILL)
        await until("the query server reaped", lambda: reaped(server), 30)
        new_server = await until("a new query server", lambda: child_running(hub, QUERY_SERVER), 60)
        assert new_server != server
        await register("query-server-down")
        await until("every PubAck'd registration kept", everything_kept, 60)

        # 5. The hub child: dev starts another one, which serves (after its standby wait).
        os.kill(hub, signal.SIGKILL)
        await register("hub-down")
        await until("dev reports the hub", lambda: out.count("hub exited with code -9"), 30)
        await until("the hub child reaped", lambda: reaped(hub), 30)
        new_hub = await until("a new hub child", lambda: child_running(proc.pid, HUB_RUN), 60)
        assert new_hub != hub
        await until("the new hub answers", lambda: out.count("hub answering again"), 60)
        await until("every PubAck'd registration kept", everything_kept, 60)
        assert alive(new_hub) and alive(postmaster)
        assert out.count("hub running") == 1  # announced once

        await nc.close()
        nc = None
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(proc.wait, 90)
    finally:
        if nc is not None:
            await nc.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    assert proc.returncode == 0, fail_text()
    assert out.lines[-1].strip() == "hub dev: stopped", fail_text()
    assert not any(_listening(p) for p in ports)
    assert not alive(new_hub) and not alive(postmaster)


def test_hub_dev_stops_on_a_configuration_error(stack_root):
    """A configuration error of the hub (exit code 2) is not restarted: dev stops every
    server and exits 2, with the hub's own message in its output."""
    data = stack_root / "hub-dev-config-error"
    env = {**os.environ, "HUB_LOG_FORMAT": "xml"}
    done = subprocess.run(
        [sys.executable, "-m", "hub", "dev", "--data", str(data)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout
    assert "HUB_LOG_FORMAT='xml'" in done.stdout
    assert done.stdout.count("hub exited with code 2") == 1, done.stdout
    assert "hub running" not in done.stdout
    assert done.stdout.rstrip().endswith("hub dev: stopped"), done.stdout
    table = "".join(line for line in done.stdout.splitlines(keepends=True) if line.startswith("  "))
    ports = [int(p) for p in re.findall(PORT, table)]
    assert len(ports) == 3, done.stdout
    assert not any(_listening(p) for p in ports)


def test_restart_backoff_doubles_to_its_cap_and_resets_after_a_good_run():
    """1, 2, 4 ... capped at 30 s between restarts; back to 1 s once the restarted process
    has run 60 s."""
    backoff = Backoff()
    backoff.started(0.0)
    assert [backoff.delay(1.0) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    backoff.started(100.0)
    assert backoff.delay(159.0) == 30  # ran 59 s: still failing fast
    backoff.started(200.0)
    assert backoff.delay(260.0) == 1  # ran 60 s: a fresh failure
    backoff.started(261.0)
    assert backoff.delay(262.0) == 2
