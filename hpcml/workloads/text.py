"""Text that every node already has: the Python standard library's own source, read as bytes.

No download, no tokenizer: the files of the running interpreter's stdlib (tests and bundled packages left
out), in sorted order, each assigned to train or validation by a hash of its path, so the split is the same
on every node and in every run, and no file's text is on both sides. A sample is a window of
`block_size + 1` bytes: the inputs and, shifted by one, the next byte to predict at every position.
"""

from __future__ import annotations

import hashlib
import sysconfig
import zlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

from hpcml.errors import DataError

SPLITS = ("train", "val")
# Not the language's own code, or not code a model should learn from.
LEFT_OUT = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's .py files, sorted by their path below `root` (the stdlib directory)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = [p for p in root.rglob("*.py") if not LEFT_OUT & set(p.relative_to(root).parts)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def in_validation(relative: str, val_every: int) -> bool:
    """About one file in `val_every` is held out: by a hash of its path, stable across machines and runs."""
    return zlib.crc32(relative.encode()) % val_every == 0


class PythonSourceBytes(Dataset):
    """Windows of `block_size + 1` bytes of stdlib source: (inputs, next-byte targets), both int64.

    `jitter` shifts each window by a random offset within its block, drawn in `__getitem__` (hpcml seeds it
    per sample and step, so a resumed run draws the same); evaluation windows stay fixed."""

    def __init__(
        self,
        split: str = "train",
        block_size: int = 128,
        max_bytes: int = 2_000_000,
        val_every: int = 10,
        jitter: bool = True,
        root: str | None = None,
    ):
        if split not in SPLITS:
            raise DataError(f"PythonSourceBytes: split={split!r}; use one of {', '.join(SPLITS)}.")
        base = Path(root or sysconfig.get_paths()["stdlib"])
        parts, size = [], 0
        for path in stdlib_sources(base):
            if in_validation(path.relative_to(base).as_posix(), val_every) != (split == "val"):
                continue
            text = path.read_bytes() + b"\n"
            parts.append(text[: max_bytes - size])
            size += len(parts[-1])
            if size >= max_bytes:
                break
        blob = b"".join(parts)
        self.block_size, self.jitter = block_size, jitter
        # One window more than the count below could need: a jittered last window still fits.
        self.windows = (len(blob) - 1) // block_size - 1
        if self.windows < 1:
            raise DataError(
                f"PythonSourceBytes({split}): {len(blob)} bytes of source under {base} do not fill two windows of "
                f"{block_size}; raise max_bytes or lower block_size."
            )
        self.data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        # Names this exact text in logs and results: two nodes with different Pythons would show it.
        self.sha256 = hashlib.sha256(blob).hexdigest()

    def __len__(self) -> int:
        return self.windows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.block_size
        if self.jitter:
            start += int(torch.randint(self.block_size, ()))
        window = self.data[start : start + self.block_size + 1].long()
        return window[:-1], window[1:]
