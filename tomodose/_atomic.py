"""Atomic file writes: every file the package writes appears complete or not at all.

A writer gets a temporary path in the target's folder (same file system, so the final
:func:`os.replace` is atomic); on success the temporary gets the usual permissions (``0666 &
~umask``; :func:`tempfile.mkstemp` creates ``0600``) and replaces the target; on any exception,
``KeyboardInterrupt`` included, it is deleted and the target is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path, *, suffix: str = ".tmp", mkdir: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; move it onto ``path`` when the block succeeds.

    Parameters
    ----------
    path : str or Path
        Final file.
    suffix : str
        Suffix of the temporary (writers that pick the format from the name need the real one,
        e.g. ``".tmp.mha"``).
    mkdir : bool
        Create the target's folder if missing; otherwise a missing folder raises
        ``FileNotFoundError`` before anything is written.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if mkdir:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        raise FileNotFoundError(f"output folder {str(folder)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path, data: bytes, *, mkdir: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_path(path, mkdir=mkdir) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path, text: str, *, mkdir: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), mkdir=mkdir)
