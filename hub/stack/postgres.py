"""PostgreSQL 16 from the binaries bundled in the ``pgserver`` wheel (its Python API unused).

PostgreSQL refuses to run as root. When we are root, ``initdb`` and ``postgres`` run as
``nobody:nogroup`` through ``setpriv``, and the cluster directory is chowned to them. To
load its binaries and libraries from wherever the project lies (a clone under a mode-0700
home, say) ``nobody`` gets one capability, CAP_DAC_READ_SEARCH (read and list any file),
when this process may hand it on (in its bounding and effective sets); without it every
directory on the way must be traversable by others, which ``prepare()`` checks first.
The uid change clears the parent death signal, so ``setpriv --pdeathsig keep`` sets it
again before exec'ing postgres.

Because such a server can read any file, no local user may be its superuser for free: a
new cluster gets password (SCRAM) authentication with a random password, kept in
``<data_dir>/password`` (mode 0600, ours); ``password`` and ``dsn()`` carry it. A cluster
initialised before that (no password file) keeps its trust authentication.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import structlog

from hub.stack._process import ManagedProcess, StackError, process_alive, run_coroutine

log = structlog.get_logger(__name__)

_RUN_AS = ("nobody", "nogroup")
_CAP_DAC_READ_SEARCH = 2  # bit number in /proc/<pid>/status Cap* masks
_SHM_IN_USE = "pre-existing shared memory block"
_SHM_RETRY_S = 30.0


def _may_grant_dac_read_search() -> bool:
    """Whether CAP_DAC_READ_SEARCH is in this process's bounding and effective sets."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    masks = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("CapBnd", "CapEff"):
            masks[key] = int(value.strip(), 16)
    return len(masks) == 2 and all(mask >> _CAP_DAC_READ_SEARCH & 1 for mask in masks.values())


def _blocking_dir(target: Path, uid: int, gid: int) -> Path | None:
    """The first existing directory on the way to (and including) ``target`` that
    ``uid``/``gid`` (no supplementary groups) may not traverse, by its mode bits."""
    for path in (target.absolute(), target.resolve()):
        for directory in [*reversed(path.parents), path]:
            try:
                info = directory.stat()
            except FileNotFoundError:
                break  # not there yet: created by us later
            if info.st_uid == uid:
                bit = stat.S_IXUSR
            elif info.st_gid == gid:
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if not info.st_mode & bit:
                return directory
    return None


def pg_bin_dir() -> Path:
    """``pgserver/pginstall/bin`` of the installed ``pgserver`` wheel."""
    spec = importlib.util.find_spec("pgserver")
    for location in (spec and spec.submodule_search_locations) or []:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "postgres").is_file():
            return candidate
    raise StackError("PostgreSQL binaries not found: install the 'embedded' extra (pgserver)")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (replaced atomically) readable by its owner only."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text + "\n")
    tmp.replace(path)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresServer(ManagedProcess):
    """A PostgreSQL cluster in ``data_dir/pgdata`` listening on 127.0.0.1 only.

    New clusters authenticate with a password (``password``); see the module docstring.
    """

    name = "postgres"
    start_timeout = 30.0
    stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM would wait for clients to leave
    stop_timeout = 15.0
    user = "postgres"

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        super().__init__(data_dir, port)
        self.pgdata = self.data_dir / "pgdata"
        self.password_path = self.data_dir / "password"
        self._as_root = os.geteuid() == 0
        self._grant_read_search = self._as_root and _may_grant_dac_read_search()
        self._password: str | None = None

    @property
    def password(self) -> str:
        """The superuser's password; '' for a cluster made before passwords (trust)."""
        if self._password is None:
            try:
                self._password = self.password_path.read_text().strip()
            except FileNotFoundError:
                return ""
        return self._password

    def dsn(self, db: str = "postgres") -> str:
        auth = f"{self.user}:{self.password}" if self.password else self.user
        return f"postgresql://{auth}@{self.host}:{self.port}/{db}"

    # -- running the binaries ------------------------------------------------------------

    def _wrap(self, argv: list[str]) -> list[str]:
        if not self._as_root:
            return argv
        user, group = _RUN_AS
        # The capability passes the uid change and the exec as an ambient one. access(2),
        # with which initdb and postgres check their own binary, drops all capabilities
        # of a non-root caller unless SECBIT_NO_SETUID_FIXUP is set (it changes nothing
        # else here: postgres never changes its uid).
        caps = (
            [
                "--inh-caps=+dac_read_search",
                "--ambient-caps=+dac_read_search",
                "--securebits=+no_setuid_fixup",
            ]
            if self._grant_read_search
            else []
        )
        return [
            "setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups", *caps,
            "--pdeathsig", "keep", *argv,
        ]  # fmt: skip

    def _prepare(self) -> None:
        if self._as_root and not self._grant_read_search:
            self._check_traversable()
        if (self.pgdata / "PG_VERSION").is_file():
            self._clear_stale_pid()
            return  # an initialised cluster: reuse it
        self.pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
        account = pwd.getpwnam(_RUN_AS[0]) if self._as_root else None
        if account is not None:
            os.chown(self.pgdata, account.pw_uid, account.pw_gid)
        password = secrets.token_hex(24)  # hex: no quoting needed in a DSN
        _write_private(self.password_path, password)
        self._password = None
        # initdb reads the password from a file: a copy for the account it runs as.
        pwfile = self.data_dir / ".initdb-password"
        _write_private(pwfile, password)
        try:
            if account is not None:
                os.chown(pwfile, account.pw_uid, account.pw_gid)
            initdb = self._wrap([
                str(pg_bin_dir() / "initdb"),
                "-D", str(self.pgdata),
                "-U", self.user,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E", "UTF8",
                "--no-locale",
                "--no-sync",
            ])  # fmt: skip
            done = subprocess.run(
                initdb, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
            raise StackError(f"initdb failed with code {done.returncode}:\n{output}")

    def _check_traversable(self) -> None:
        """Fail in one line unless ``nobody`` can reach the binaries and the data folder."""
        account = pwd.getpwnam(_RUN_AS[0])
        install = pg_bin_dir().parent
        targets = [
            ("the PostgreSQL binaries in", install / "bin"),
            ("the PostgreSQL libraries in", install / "lib"),
            ("the PostgreSQL libraries in", install.parents[1] / "pgserver.libs"),  # RPATH
            ("the PostgreSQL share folder", install / "share"),
            ("the data folder", self.pgdata),
        ]
        for what, target in targets:
            blocked = _blocking_dir(target, account.pw_uid, account.pw_gid)
            if blocked is not None:
                raise StackError(
                    f"PostgreSQL runs as {_RUN_AS[0]!r} (we are root without "
                    f"CAP_DAC_READ_SEARCH to lend it) and cannot reach {what} {target}: "
                    f"{blocked} is not traversable by others; run 'chmod o+x {blocked}' "
                    "or put the project and its data folder where others can traverse"
                )

    def _clear_stale_pid(self, reaped: int | None = None) -> None:
        """Remove ``postmaster.pid`` if the process it names is gone (or is ``reaped``).

        PostgreSQL itself only trusts ``kill(pid, 0)``, which also succeeds on a zombie
        or on an unrelated process that got the pid again.
        """
        path = self.pgdata / "postmaster.pid"
        try:
            pid = int(path.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return
        if pid == reaped or not process_alive(pid):
            path.unlink(missing_ok=True)
            log.info("stack.stale_pid_removed", server=self.name, pid=pid)

    def _start_again(
        self, old_pid: int | None, timeout: float | None, cancelled: Callable[[], bool] | None
    ) -> None:
        """Start on the same cluster; wait while the old backends hold its shared memory."""
        deadline = time.monotonic() + _SHM_RETRY_S
        while True:
            self._clear_stale_pid(old_pid)
            try:
                super()._start_again(old_pid, timeout, cancelled)
                return
            except StackError as exc:
                if _SHM_IN_USE not in str(exc) or time.monotonic() > deadline:
                    raise
                if cancelled is not None and cancelled():
                    raise
            log.info("stack.shared_memory_in_use", server=self.name, retry_in=0.5)
            time.sleep(0.5)

    def _command(self) -> list[str]:
        # fsync and full-page writes only protect against a crash of the machine, which a
        # dev/test cluster may lose. Commits stay synchronous: with synchronous_commit=off
        # a commit returns before its WAL is written, and a killed postmaster (its WAL
        # writer exits with it) loses commits that clients were told were done.
        return self._wrap([
            str(pg_bin_dir() / "postgres"),
            "-D", str(self.pgdata),
            "-p", str(self.port),
            "-c", f"listen_addresses={self.host}",
            "-c", "unix_socket_directories=",
            "-c", "max_connections=200",
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "logging_collector=off",
        ])  # fmt: skip

    # -- client side -----------------------------------------------------------------------

    async def _execute(self, sql: str) -> None:
        conn = await asyncpg.connect(self.dsn(), timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def _ready(self) -> bool:
        run_coroutine(lambda: self._execute("SELECT 1"), timeout=10)
        return True

    def create_database(self, name: str) -> None:
        """``CREATE DATABASE <name>`` (blocking)."""
        run_coroutine(lambda: self._execute(f"CREATE DATABASE {_quote_ident(name)}"))

    def create_database_if_missing(self, name: str) -> None:
        """Create database ``name`` unless it exists (a reused cluster keeps its databases)."""

        async def create() -> None:
            conn = await asyncpg.connect(self.dsn(), timeout=5)
            try:
                exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
                if not exists:
                    await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
            finally:
                await conn.close()

        run_coroutine(create)

    def drop_database(self, name: str) -> None:
        """``DROP DATABASE IF EXISTS <name> WITH (FORCE)`` (blocking)."""
        sql = f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)"
        run_coroutine(lambda: self._execute(sql))
