"""Durable file writes: write to a temporary name, fsync the file and its directory, rename last.

A reader (or a resumed job) then sees either the old file or the whole new one, never a torn one, even
if the writer is killed mid-write or the node loses power after the rename.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import xxhash

# Checksums for corruption (torn writes, truncation, bit rot), not for tampering: checkpoints are loaded
# with weights_only=True, which never runs code. XXH3-128 hashes at memory speed, where SHA-256 is slower
# than the disks it guards (docs/PERFORMANCE.md); SHA-256 stays readable for checkpoints written before.
CHECKSUMS: dict[str, Callable[[], object]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
DEFAULT_CHECKSUM = "xxh3_128"


@dataclass(frozen=True)
class FileDigest:
    algorithm: str
    hexdigest: str
    size: int


class HashingWriter:
    """A write-only file object that hashes what passes through it, so a file is hashed as it is written."""

    def __init__(self, raw: BinaryIO, algorithm: str = DEFAULT_CHECKSUM):
        self.raw = raw
        self.algorithm = algorithm
        self.digest = CHECKSUMS[algorithm]()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        written = self.raw.write(view)
        # A buffered file takes every byte or raises; a raw one may take fewer, and a caller that ignores the
        # count (torch's zip writer does) would leave a checksum of bytes that never reached the file.
        if written != view.nbytes:
            raise OSError(f"short write: {written} of {view.nbytes} bytes; hash only through a buffered file")
        self.digest.update(view)
        self.size += view.nbytes
        return written

    def flush(self) -> None:
        self.raw.flush()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_hashed(path: Path, write: Callable[[HashingWriter], None]) -> FileDigest:
    """Write `path` through `write`, fsync it, and return its checksum and size (no atomic rename:
    callers that publish a whole directory rename the directory instead)."""
    with open(path, "wb") as f:
        writer = HashingWriter(f)
        write(writer)
        f.flush()
        os.fsync(f.fileno())
    return FileDigest(writer.algorithm, writer.digest.hexdigest(), writer.size)


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


def digest_of(path: Path, algorithm: str, chunk: int = 8 << 20) -> str:
    """The file's checksum. A reader thread reads the next chunk while this one is hashed (file reads and
    both hashes release the GIL), so verifying a checkpoint takes about as long as reading it: read then
    hash, in turn, left the disk idle for the hashing time (a 1 GB verify: 0.66 s against a 0.54 s read)."""
    digest = CHECKSUMS[algorithm]()
    free: queue.Queue = queue.Queue()
    filled: queue.Queue = queue.Queue()
    for _ in range(2):  # two reused buffers: one being filled, one being hashed
        free.put(memoryview(bytearray(chunk)))
    fd = os.open(path, os.O_RDONLY)

    def read() -> None:
        try:
            while True:
                buffer = free.get()
                if buffer is None:  # the hashing side gave up
                    return
                n = os.readv(fd, [buffer])
                filled.put((buffer, n))
                if n == 0:
                    return
        except BaseException as err:
            filled.put((err, 0))

    reader = threading.Thread(target=read, name="hpcml-digest", daemon=True)
    reader.start()
    try:
        while True:
            buffer, n = filled.get()
            if isinstance(buffer, BaseException):
                raise buffer
            if n == 0:
                break
            digest.update(buffer[:n])
            free.put(buffer)
    finally:
        free.put(None)
        reader.join()
        os.close(fd)
    return digest.hexdigest()
