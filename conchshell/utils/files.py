"""Crash-safe file writing and file checksums, shared by checkpoints, exports, the feature
cache and the download/packaging scripts."""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import IO, Callable

#: Prefix of in-progress files; a complete file never carries it, so stale ones are safe to delete.
TEMP_PREFIX = ".tmp-"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Run ``write`` on a temp file beside ``path``, fsync it, rename it onto ``path``.

    A reader sees the complete old file or the complete new one, never half; a crash leaves
    at most a ``.tmp-`` file. The temp name is unique per call, so concurrent writers (ranks,
    workers) never collide, and the directory is fsynced so the rename itself survives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f"{TEMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; their rename is durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
