"""Durable file writes: write to a temporary name, fsync the file and its directory, rename last.

A reader (or a resumed job) then sees either the old file or the whole new one, never a torn one, even
if the writer is killed mid-write or the node loses power after the rename.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class HashingWriter:
    """A write-only file object that hashes what passes through it, so a file is hashed as it is written."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        return self.raw.write(view)

    def flush(self) -> None:
        self.raw.flush()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_hashed(path: Path, write: Callable[[HashingWriter], None]) -> tuple[str, int]:
    """Write `path` through `write`, fsync it, and return its SHA-256 and size (no atomic rename:
    callers that publish a whole directory rename the directory instead)."""
    with open(path, "wb") as f:
        writer = HashingWriter(f)
        write(writer)
        f.flush()
        os.fsync(f.fileno())
    return writer.digest.hexdigest(), writer.size


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def sha256_of(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
