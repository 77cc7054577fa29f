"""What the hub's child processes (the views process, the query servers) share: how
they are started (``spawn_child``), the environment they start with, and dying with
the hub.

A child ends when its stdin closes, which it notices once it reads its stdin. One that
is still starting (connecting to servers that may be gone) does not read it yet, so on
Linux each child also asks the kernel to kill it when the hub dies
(``PR_SET_PDEATHSIG``): a hub killed at any moment leaves no child behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path

PARENT_ENV = "HUB_PARENT_PID"
READER_LIMIT = 2**16  # asyncio's default
_PR_SET_PDEATHSIG = 1


def child_env() -> dict[str, str]:
    """The hub's environment for a child: this checkout importable (for ``import hub``)
    and the hub's pid (for ``die_with_parent``)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env[PARENT_ENV] = str(os.getpid())
    return env


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the hub that started it dies; exit at
    once if it already has. A no-op where ``prctl`` does not exist (not Linux)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = os.environ.get(PARENT_ENV)
    if parent is not None and parent.isdigit() and os.getppid() != int(parent):
        os._exit(0)  # the hub died before the request above: nothing to serve


async def spawn_child(
    module: str, *, limit: int = READER_LIMIT
) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader]:
    """Start ``module.main([fd])`` in a child process of the hub; returns the process and
    the reader of a pipe of its own back to the hub (``fd`` in the child).

    Its stdin is a pipe from the hub (what the child is told; closing it ends the
    child). It runs in its own session: a terminal's Ctrl-C reaches the hub only, which
    then stops it by closing its stdin. Its environment is ``child_env()``.
    """
    back_r, back_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", f"import sys, {module} as m; sys.exit(m.main(sys.argv[1:]))",
            str(back_w), stdin=asyncio.subprocess.PIPE, pass_fds=(back_w,), env=child_env(),
            start_new_session=True,
        )  # fmt: skip
    finally:
        os.close(back_w)
    reader = asyncio.StreamReader(limit=limit)
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(back_r, "rb", 0)
    )
    return proc, reader
