"""PostgreSQL 16 from the binaries bundled in the ``pgserver`` wheel (its Python API unused).

PostgreSQL refuses to run as root. When we are root, ``initdb`` and ``postgres`` run as
``nobody:nogroup`` through ``setpriv``; the cluster directory is chowned to them and every
parent directory of it must be traversable by others. The uid change clears the parent
death signal, so ``setpriv --pdeathsig keep`` sets it again before exec'ing postgres.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import signal
import stat
import subprocess
from pathlib import Path

import asyncpg

from hub.stack._process import ManagedProcess, StackError, run_coroutine

_RUN_AS = ("nobody", "nogroup")


def pg_bin_dir() -> Path:
    """``pgserver/pginstall/bin`` of the installed ``pgserver`` wheel."""
    spec = importlib.util.find_spec("pgserver")
    for location in (spec and spec.submodule_search_locations) or []:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "postgres").is_file():
            return candidate
    raise StackError("PostgreSQL binaries not found: install the 'embedded' extra (pgserver)")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresServer(ManagedProcess):
    """A PostgreSQL cluster in ``data_dir/pgdata`` listening on 127.0.0.1 only (trust auth)."""

    name = "postgres"
    start_timeout = 30.0
    stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM would wait for clients to leave
    stop_timeout = 15.0
    user = "postgres"

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        super().__init__(data_dir, port)
        self.pgdata = self.data_dir / "pgdata"
        self._as_root = os.geteuid() == 0

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{db}"

    # -- running the binaries ------------------------------------------------------------

    def _wrap(self, argv: list[str]) -> list[str]:
        if not self._as_root:
            return argv
        user, group = _RUN_AS
        return [
            "setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups",
            "--pdeathsig", "keep", *argv,
        ]  # fmt: skip

    def _prepare(self) -> None:
        if (self.pgdata / "PG_VERSION").is_file():
            return  # an initialised cluster: reuse it
        if self._as_root:
            self._check_traversable()
        self.pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._as_root:
            account = pwd.getpwnam(_RUN_AS[0])
            os.chown(self.pgdata, account.pw_uid, account.pw_gid)
        initdb = self._wrap([
            str(pg_bin_dir() / "initdb"),
            "-D", str(self.pgdata),
            "-U", self.user,
            "--auth=trust",
            "-E", "UTF8",
            "--no-locale",
            "--no-sync",
        ])  # fmt: skip
        done = subprocess.run(
            initdb, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
            raise StackError(f"initdb failed with code {done.returncode}:\n{output}")

    def _check_traversable(self) -> None:
        for parent in self.pgdata.parents:
            if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
                raise StackError(
                    f"PostgreSQL runs as {_RUN_AS[0]!r} (we are root) and cannot reach "
                    f"{self.pgdata}: {parent} is not traversable by others (chmod o+x it)"
                )

    def _command(self) -> list[str]:
        return self._wrap([
            str(pg_bin_dir() / "postgres"),
            "-D", str(self.pgdata),
            "-p", str(self.port),
            "-c", f"listen_addresses={self.host}",
            "-c", "unix_socket_directories=",
            "-c", "max_connections=200",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
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
