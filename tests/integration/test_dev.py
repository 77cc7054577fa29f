"""`hub dev` brings up the embedded stack and the hub, says where, and Ctrl-C stops all."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import msgspec
import nats

from tests.integration.conftest import ROOT, query


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
        ports = [int(p) for p in re.findall(r"(?:nats|postgresql|redis)://\S*?:(\d+)", table)]
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
