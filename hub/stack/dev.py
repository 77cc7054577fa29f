"""``hub dev``: the embedded stack plus the hub as a supervised child process.

The dev process starts the stack, then runs ``python -m hub run`` as a child with the
stack's environment over its own (so ``HUB_*`` settings exported by the user still
apply), and watches everything from its main thread, every ``POLL_S``:

* the hub child: once it answers ``hub.query.infrastructure`` it is announced; if it
  exits it is started again after a backoff (1, 2, 4 ... ``BACKOFF_CAP_S`` s, back to 1
  after ``BACKOFF_RESET_S`` s of running), except on exit code 2 (a configuration
  error, which a restart cannot fix): then everything stops and dev exits 2;
* every server of the stack: one that exited is reaped, reported in one line and
  started again on the same port and data folder, with the same backoff.

SIGINT/SIGTERM (Ctrl-C) stop the hub child first (SIGTERM, bounded wait, then SIGKILL),
then the servers in reverse start order. The hub child runs in a session of its own, so
that a Ctrl-C in the terminal reaches dev only and the order above holds; like the
servers it gets the parent-death signal, so nothing outlives a killed dev process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import nats
import nats.errors

from hub.stack._process import ManagedProcess, StackError, _die_with_parent, run_coroutine
from hub.stack.embedded import EmbeddedStack

READY_MESSAGE = "hub dev: hub running; Ctrl-C stops everything"
HUB_COMMAND = [sys.executable, "-m", "hub", "run"]
READY_SUBJECT = "hub.query.infrastructure"
POLL_S = 0.5
BACKOFF_FIRST_S = 1.0
BACKOFF_CAP_S = 30.0
BACKOFF_RESET_S = 60.0
HUB_STOP_TIMEOUT_S = 30.0
CONFIG_ERROR = 2

# What ``hub run``'s exit codes mean.
_EXIT_MEANING = {
    0: "stopped",
    1: "gave up after repeated failures",
    2: "configuration error",
    3: "fenced: another hub took over",
}


class Backoff:
    """Delays before restarting something: 1, 2, 4 ... capped; back to the first delay
    once what was restarted has run ``reset_after`` seconds."""

    def __init__(
        self,
        first: float = BACKOFF_FIRST_S,
        cap: float = BACKOFF_CAP_S,
        reset_after: float = BACKOFF_RESET_S,
    ) -> None:
        self.first = first
        self.cap = cap
        self.reset_after = reset_after
        self._next = first
        self._started = time.monotonic()

    def started(self, now: float) -> None:
        """What is watched (re)started at ``now``."""
        self._started = now

    def delay(self, now: float) -> float:
        """The delay before the next restart, after what is watched stopped at ``now``."""
        if now - self._started >= self.reset_after:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay


def _say(line: str, file: TextIO | None = None) -> None:
    print(line, file=file or sys.stdout, flush=True)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


async def _hub_answers(nats_url: str) -> bool:
    """Whether a hub answers ``hub.query.infrastructure`` with ``success: true``."""

    async def quiet(exc: Exception) -> None:
        del exc

    nc = await nats.connect(
        nats_url,
        connect_timeout=1,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        error_cb=quiet,
    )
    try:
        reply = await nc.request(READY_SUBJECT, b"{}", timeout=2.0)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return False
    finally:
        await nc.close()
    answer: Any = json.loads(reply.data)
    return isinstance(answer, dict) and answer.get("success") is True


class _Watched:
    """Restart bookkeeping of one server."""

    def __init__(self, server: ManagedProcess) -> None:
        self.server = server
        self.backoff = Backoff()
        self.restart_at: float | None = None  # set while the server is down


class DevSupervisor:
    """Runs the hub child over a started :class:`EmbeddedStack` and keeps both up."""

    def __init__(self, stack: EmbeddedStack, *, command: list[str] | None = None) -> None:
        self.stack = stack
        self.command = list(command or HUB_COMMAND)
        self._stop_requested = False
        self._hub: subprocess.Popen[bytes] | None = None
        self._hub_backoff = Backoff()
        self._hub_restart_at = 0.0
        self._hub_ready = False  # this incarnation answered
        self._announced = False  # READY_MESSAGE printed (once per dev run)
        self._next_probe = 0.0
        self._watched = [_Watched(server) for server in stack.servers]

    # -- signals ----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self._stop_requested = True

    def stopping(self) -> bool:
        return self._stop_requested

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop_requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until SIGINT/SIGTERM (0) or a configuration error of the hub (2).

        Stops the hub child and the stack before returning. Call from the main thread.
        """
        handlers = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        code = 0
        try:
            self._spawn_hub()
            while not self._stop_requested:
                self._watch_servers()
                if self._stop_requested:
                    break
                hub_code = self._watch_hub()
                if hub_code is not None:
                    code = hub_code
                    break
                self._sleep(POLL_S)
        finally:
            self._stop_hub()
            self.stack.stop()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        _say("hub dev: stopped")
        return code

    # -- the hub child ------------------------------------------------------------------------

    def _hub_env(self) -> dict[str, str]:
        env = {**os.environ, **self.stack.env()}
        env.setdefault("PYTHONUNBUFFERED", "1")  # its lines interleave with ours in order
        return env

    def _spawn_hub(self) -> None:
        main_thread = threading.current_thread() is threading.main_thread()
        self._hub = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            env=self._hub_env(),
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()) if main_thread else None,
        )
        now = time.monotonic()
        self._hub_backoff.started(now)
        self._hub_ready = False
        self._next_probe = now

    def _watch_hub(self) -> int | None:
        """One look at the hub child; an exit code for dev to exit with, else None."""
        now = time.monotonic()
        if self._hub is None:
            if now >= self._hub_restart_at:
                self._spawn_hub()
            return None
        code = self._hub.poll()
        if code is None:
            if not self._hub_ready and now >= self._next_probe:
                self._probe_hub()
            return None
        self._hub = None
        meaning = _EXIT_MEANING.get(code, f"signal {-code}" if code < 0 else "")
        what = f"hub dev: hub exited with code {code}" + (f" ({meaning})" if meaning else "")
        if code == CONFIG_ERROR:
            _say(f"{what}; not restarting it, stopping everything", sys.stderr)
            return CONFIG_ERROR
        delay = self._hub_backoff.delay(now)
        _say(f"{what}; restarting in {delay:g} s")
        self._hub_restart_at = now + delay
        return None

    def _probe_hub(self) -> None:
        try:
            ready = run_coroutine(lambda: _hub_answers(self.stack.nats.url), timeout=5.0)
        except Exception:
            ready = False
        self._next_probe = time.monotonic() + POLL_S
        if not ready:
            return
        self._hub_ready = True
        if not self._announced:
            self._announced = True
            _say(READY_MESSAGE)
        else:
            _say(f"hub dev: hub answering again (pid {self._hub.pid if self._hub else '?'})")

    def _stop_hub(self) -> None:
        proc, self._hub = self._hub, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(HUB_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _say(f"hub dev: the hub did not stop within {HUB_STOP_TIMEOUT_S:g} s; killing it")
            proc.kill()
            proc.wait()

    # -- the servers ---------------------------------------------------------------------------

    def _watch_servers(self) -> None:
        for watched in self._watched:
            if self._stop_requested:
                return
            server = watched.server
            now = time.monotonic()
            if watched.restart_at is None:
                code = server.poll()  # reaps it if it exited
                if code is None:
                    continue
                delay = watched.backoff.delay(now)
                _say(f"hub dev: {server.name} exited with code {code}; restarting in {delay:g} s")
                watched.restart_at = now + delay
            elif now >= watched.restart_at:
                self._restart(watched)

    def _restart(self, watched: _Watched) -> None:
        server = watched.server
        try:
            server.restart(cancelled=self.stopping)
        except StackError as exc:
            if self._stop_requested:
                return
            delay = watched.backoff.delay(time.monotonic())
            _say(
                f"hub dev: {server.name} could not be restarted ({_first_line(exc)}); "
                f"trying again in {delay:g} s"
            )
            watched.restart_at = time.monotonic() + delay
            return
        watched.restart_at = None
        watched.backoff.started(time.monotonic())
        _say(f"hub dev: {server.name} restarted (pid {server.pid}, port {server.port})")


def run_dev(data: Path, *, with_kafka: bool = False) -> int:
    """``hub dev``: start the stack in ``data``, say where it listens, supervise the hub.

    The exit code: 0 after Ctrl-C, 1 if the stack cannot start, 2 if the hub's
    configuration is wrong.
    """
    data = Path(data).resolve()
    data.mkdir(parents=True, exist_ok=True)
    stack = EmbeddedStack(data, with_kafka=with_kafka)
    _say(f"hub dev: starting the embedded stack in {data} ...")
    try:
        stack.start()
        for name, where in stack.describe():
            _say(f"  {name:<24} {where}")
        _say(f"  {'event log':<24} {stack.env()['HUB_EVENT_LOG']}")
        supervisor = DevSupervisor(stack)
    except StackError as exc:
        _say(f"hub dev: {exc}", sys.stderr)
        return 1
    except KeyboardInterrupt:
        stack.stop()
        _say("hub dev: stopped")
        return 0
    return supervisor.run()
