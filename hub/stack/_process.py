"""Common machinery of the stack's servers: spawn with a log file, wait until ready, stop.

Every server is a direct child of this Python process, started in its own session
(so a Ctrl-C in the terminal reaches the hub, which then stops the servers in order)
and with its stdout/stderr written to ``log_path``.

Orphans: a child spawned from the main thread gets ``PR_SET_PDEATHSIG(SIGKILL)``, so the
kernel kills it if this process dies without running its ``atexit`` hooks. Linux sends
that signal when the *thread* that forked the child exits, so it is only set for children
spawned from the main thread; children spawned from other threads rely on ``atexit``.

Restarts: ``poll()`` reaps a server that exited by itself and ``restart()`` starts it again
on the same port and data folder (``hub dev`` does both, from the main thread).
"""

from __future__ import annotations

import abc
import asyncio
import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

import structlog

log = structlog.get_logger(__name__)

HOST = "127.0.0.1"
_T = TypeVar("_T")
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 40


class StackError(RuntimeError):
    """A server of the stack could not be started (the message ends with its log's tail)."""


# --- ports -------------------------------------------------------------------------------

_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (and not handed out before by this process)."""
    with _ports_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port: int = sock.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise StackError("no free port found on 127.0.0.1")


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:<port> (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


# --- helpers -------------------------------------------------------------------------------


def run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]], timeout: float = 30.0) -> _T:
    """Run ``factory()`` to completion on a fresh event loop in a helper thread.

    A thread keeps this usable from code that already runs an event loop and leaves the
    calling thread's event loop (e.g. pytest-asyncio's) untouched.
    """
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(factory()))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="hub-stack-async", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"coroutine did not finish within {timeout:.0f} s")
    if error:
        raise error[0]
    return result[0]


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def owns_listening_port(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds the listening socket on TCP ``port`` (Linux /proc).

    ``None`` when /proc cannot tell (not Linux, or no permission). Guards readiness probes
    against answering for another server that already had the port.
    """
    inodes: set[str] = set()
    tables_read = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        tables_read += 1
        for row in rows:
            fields = row.split()
            # local_address is HEXIP:HEXPORT, st "0A" is LISTEN, field 9 is the inode.
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    if not tables_read:
        return None
    if not inodes:
        return False
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                return True
    return False


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (exited, not yet reaped)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while read
        return False
    except OSError:  # no /proc here: ask the kernel (a zombie then counts as alive)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # The state follows the command name, which is in parentheses and may contain any.
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


try:
    # Loaded before any fork: dlopen() in a forked child of a threaded parent may deadlock.
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - non-glibc platforms
    _libc = None


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os.kill(os.getpid(), signal.SIGKILL)

    return preexec


_live: dict[ManagedProcess, None] = {}  # insertion-ordered: stopped newest first
_live_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        servers = list(reversed(_live))
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


# --- the base class ----------------------------------------------------------------------


class ManagedProcess(abc.ABC):
    """A server process on 127.0.0.1 owned by this Python process.

    Subclasses define ``name``, ``_command()`` and ``_ready()``; optionally ``_prepare()``
    (one-off set-up such as initdb, run before spawning) and ``_after_stop()``.
    ``start()`` = ``prepare()`` + ``spawn()`` + ``wait_ready()``; the three steps are public
    so that :class:`~hub.stack.EmbeddedStack` can prepare and wait in worker threads while
    spawning from the caller's thread (see the module docstring about PDEATHSIG).
    """

    name: ClassVar[str] = "server"
    start_timeout: ClassVar[float] = 30.0
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    stop_timeout: ClassVar[float] = 10.0
    poll_interval: ClassVar[float] = 0.05

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.host = HOST
        self.port = free_port() if port is None else port
        self.log_path = self.data_dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._spawned_at = 0.0
        self.startup_seconds: float | None = None

    # -- subclass hooks -------------------------------------------------------------------

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """The server's command line."""

    @abc.abstractmethod
    def _ready(self) -> bool:
        """One readiness probe: True when the server answers a real client."""

    def _prepare(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """One-off set-up before spawning (may run in any thread; no long-lived children)."""

    def _env(self) -> dict[str, str] | None:
        return None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def poll(self) -> int | None:
        """The exit code once the process has exited (reaping it), else None.

        None as well before the first ``spawn()``. A negative code -N means signal N.
        """
        proc = self._proc
        return None if proc is None else proc.poll()

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()

    def spawn(self) -> None:
        with self._lock:
            if self.running:
                return
            command = self._command()
            main_thread = threading.current_thread() is threading.main_thread()
            with self.log_path.open("wb") as log_file:
                self._proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    env=self._env(),
                    start_new_session=True,
                    preexec_fn=_die_with_parent(os.getpid()) if main_thread else None,
                )
            with _live_lock:
                _live[self] = None
            self._spawned_at = time.monotonic()
            log.debug("stack.spawned", server=self.name, pid=self._proc.pid, port=self.port)

    def wait_ready(
        self, timeout: float | None = None, *, cancelled: Callable[[], bool] | None = None
    ) -> None:
        """Block until the server answers; ``cancelled()`` turning true gives up early."""
        timeout = self.start_timeout if timeout is None else timeout
        proc = self._proc
        if proc is None:
            raise StackError(f"{self.name}: wait_ready() before spawn()")
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                self._fail(f"exited with code {proc.returncode} while starting")
            if cancelled is not None and cancelled():
                self._fail("start cancelled")
            try:
                if owns_listening_port(proc.pid, self.port) is not False and self._ready():
                    break
            except Exception as exc:
                log.debug("stack.not_ready", server=self.name, error=repr(exc))
            if time.monotonic() > deadline:
                self._fail(f"not ready after {timeout:.0f} s")
            time.sleep(self.poll_interval)
        self.startup_seconds = time.monotonic() - self._spawned_at
        log.info(
            "stack.ready",
            server=self.name,
            port=self.port,
            pid=proc.pid,
            seconds=round(self.startup_seconds, 2),
        )

    def start(self, timeout: float | None = None) -> Self:
        """Start the server and block until it answers; ``timeout`` bounds the wait."""
        if self.running:
            return self
        self.prepare()
        self.spawn()
        self.wait_ready(timeout)
        return self

    def restart(
        self, timeout: float | None = None, *, cancelled: Callable[[], bool] | None = None
    ) -> None:
        """Start the server again, on the same port and data folder, after it exited.

        The old process is reaped first and its log kept as ``<log>.1``. Blocks until the
        server answers, like ``start()``; call it from the main thread (PDEATHSIG, see the
        module docstring). Raises :class:`StackError` if the process is still running.
        """
        with self._lock:
            old = self._proc
            if old is not None and old.poll() is None:
                raise StackError(f"{self.name}: restart() while pid {old.pid} still runs")
        if self.log_path.exists():
            self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))
        self._start_again(None if old is None else old.pid, timeout, cancelled)

    def _start_again(
        self, old_pid: int | None, timeout: float | None, cancelled: Callable[[], bool] | None
    ) -> None:
        """``restart()``'s spawn and wait; ``old_pid`` is the reaped process (None: none)."""
        self.spawn()
        self.wait_ready(timeout, cancelled=cancelled)

    def stop(self) -> None:
        """Stop the server (signal, wait, then SIGKILL). Idempotent."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(self.stop_signal)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning("stack.kill", server=self.name, pid=proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
                log.info("stack.stopped", server=self.name, port=self.port)
            with _live_lock:
                _live.pop(self, None)

    def _fail(self, reason: str) -> None:
        self.stop()
        tail = log_tail(self.log_path)
        raise StackError(f"{self.name} on port {self.port} {reason}; {self.log_path}:\n{tail}")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"
