"""The one place benchmarks get a scratch directory for their servers."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def scratch_root(prefix: str) -> Iterator[Path]:
    """A fresh temporary directory, removed afterwards. Opened to other users because
    PostgreSQL runs as ``nobody`` when the benchmark runs as root."""
    root = Path(tempfile.mkdtemp(prefix=prefix)).resolve()
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
