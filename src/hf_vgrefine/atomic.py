"""Atomic file output: write to a temp file in the target folder, then rename over the target.

A crash or an exception leaves either the old file or the new one, never a half-written one; the temp
file is removed on failure. New files get the usual permissions (``0o666`` minus the umask), unlike
``tempfile.mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import contextlib
import os
import uuid


def _temp_name(path: str) -> str:
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Context manager yielding a temp path next to ``path``; on clean exit it is renamed to ``path``.

    For writers that need a file name (``fig.savefig(tmp)``). The temp file is created empty (mode
    ``0o666 & ~umask``) so that its permissions are those of a normal new file.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = _temp_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: bytes | str, fsync: bool = False) -> str:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; ``fsync`` flushes it to disk
    before the rename. Returns ``path`` as a string."""
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return path
