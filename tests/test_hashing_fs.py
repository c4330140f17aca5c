import mmap
import os
import re

import pytest
import torch
import torch.distributed.checkpoint as dcp

from hpcml import fileio
from hpcml.compute.checkpoint import CheckpointCorruptError
from hpcml.compute.checkpoint.hashing_fs import HashingFileSystem
from hpcml.compute.checkpoint.sharded import SHARDS_DIR, shard_entries
from hpcml.fileio import CHECKSUMS, DEFAULT_CHECKSUM, FileDigest, HashingWriter, digest_of


def on_disk(path) -> FileDigest:
    return FileDigest(DEFAULT_CHECKSUM, digest_of(path, DEFAULT_CHECKSUM), path.stat().st_size)


def test_every_file_dcp_writes_is_hashed_as_written_and_known_by_its_final_name(tmp_path):
    """The checksums kept while DCP wrote equal the files' own, for its data files and for `.metadata`,
    which DCP writes under a temporary name and renames."""
    writer = dcp.FileSystemWriter(tmp_path, sync_files=True)
    writer.fs = HashingFileSystem()
    state = {"w": torch.randn(64, 32), "b": torch.arange(7), "nested": {"m": torch.ones(3, dtype=torch.bfloat16)}}
    dcp.save(state, storage_writer=writer, no_dist=True)
    files = sorted(p for p in tmp_path.iterdir() if p.is_file())
    assert {p.name for p in files} >= {".metadata"} and any(p.suffix == ".distcp" for p in files)
    assert sorted(writer.fs.digests) == files
    for path in files:
        assert writer.fs.digests[path] == on_disk(path), path.name
    loaded = {"w": torch.empty(64, 32), "b": torch.empty(7, dtype=torch.int64),
              "nested": {"m": torch.empty(3, dtype=torch.bfloat16)}}  # fmt: skip
    dcp.load(loaded, checkpoint_id=tmp_path, no_dist=True)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    assert torch.equal(loaded["nested"]["m"], state["nested"]["m"])


def test_reads_pass_through_and_only_fresh_writes_are_hashed(tmp_path):
    fs = HashingFileSystem()
    path = tmp_path / "f"
    with fs.create_stream(path, "wb") as stream:
        stream.write(b"abc")
        assert stream.tell() == 3
    with fs.create_stream(path, "rb") as stream:
        assert stream.read() == b"abc"
    assert list(fs.digests) == [path]
    for mode in ("ab", "r+b", "rb+"):  # each would hash only part of the file
        with (
            pytest.raises(ValueError, match=re.escape(f"mode {mode!r}; hashing its files needs a fresh write")),
            fs.create_stream(path, mode),
        ):
            pass
    assert path.read_bytes() == b"abc"
    fs.rm_file(path)
    assert fs.digests == {} and not path.exists()


def test_a_file_whose_writing_failed_has_no_checksum(tmp_path):
    """What a rank cannot vouch for stays out of its digests, so rank 0 refuses the folder (sharded.py)."""
    fs = HashingFileSystem()
    with pytest.raises(RuntimeError, match="disk gone"), fs.create_stream(tmp_path / "f", "wb") as stream:
        stream.write(b"half")
        raise RuntimeError("disk gone")
    assert fs.digests == {}


def test_the_descriptor_dcp_fsyncs_has_every_byte_written_behind_it(tmp_path):
    """DCP fsyncs its `.metadata` through fileno() without flushing first."""
    fs = HashingFileSystem()
    path = tmp_path / "f"
    with fs.create_stream(path, "wb") as stream:
        stream.write(b"x" * 100)  # far less than the file object's buffer
        os.fstat(stream.fileno())
        assert path.stat().st_size == 100


def test_a_short_write_fails_instead_of_vouching_for_bytes_never_written(tmp_path):
    class TakesHalf:
        def write(self, data):
            return len(data) // 2

    writer = HashingWriter(TakesHalf())
    with pytest.raises(OSError, match="short write: 2 of 4 bytes"):
        writer.write(b"abcd")
    assert writer.size == 0


@pytest.mark.skipif(fileio._SYNC_FILE_RANGE is None, reason="needs Linux's sync_file_range")
def test_a_big_file_is_handed_to_the_disk_in_stretches_as_it_is_written(tmp_path, monkeypatch):
    """Every WRITEBACK_CHUNK bytes written, the kernel is asked (sync_file_range, here on Linux, succeeding) to
    start writing the whole pages since the last stretch, in order from the file's start, with those bytes in
    the file already; the file and its checksum are as without it. An in-memory file is hashed and never handed on."""
    import io

    chunk = fileio.WRITEBACK_CHUNK
    asked = []

    def start_writeback(fd, offset, nbytes):
        asked.append((offset, nbytes, os.fstat(fd).st_size))
        started = real(fd, offset, nbytes)
        assert started  # Linux's sync_file_range, on this file system
        return started

    real = fileio.start_writeback
    monkeypatch.setattr(fileio, "start_writeback", start_writeback)
    data = os.urandom(2 * chunk + chunk // 2)
    path = tmp_path / "big"
    digest = fileio.write_hashed(path, lambda f: [f.write(data[i : i + 4000]) for i in range(0, len(data), 4000)])
    assert path.read_bytes() == data and digest == on_disk(path)
    ends = [offset + nbytes for offset, nbytes, _ in asked]
    assert [offset for offset, _, _ in asked] == [0, *ends[:-1]] and len(asked) == 2
    assert all(nbytes >= chunk and end % mmap.PAGESIZE == 0 for (_, nbytes, _), end in zip(asked, ends, strict=True))
    assert all(size >= end for (_, _, size), end in zip(asked, ends, strict=True))

    asked.clear()
    in_memory = HashingWriter(io.BytesIO())
    in_memory.write(data)
    in_memory.write(data)
    assert asked == [] and in_memory.raw.getvalue() == data + data
    assert in_memory.digest.hexdigest() == CHECKSUMS[DEFAULT_CHECKSUM](data + data).hexdigest()


def test_a_file_system_that_refuses_writeback_still_gets_the_whole_file_and_its_checksum(tmp_path, monkeypatch):
    """Where sync_file_range fails (a pipe, a file system without it), the writer asks once, stops asking,
    and the file is written and hashed as ever."""
    refused = []
    monkeypatch.setattr(fileio, "start_writeback", lambda fd, offset, nbytes: refused.append(offset) or False)
    data = os.urandom(3 * fileio.WRITEBACK_CHUNK)
    path = tmp_path / "big"
    digest = fileio.write_hashed(path, lambda f: [f.write(data[i : i + 65536]) for i in range(0, len(data), 65536)])
    assert refused == [0] and path.read_bytes() == data and digest == on_disk(path)


def test_dcp_shards_handed_to_the_disk_mid_file_keep_their_offsets(tmp_path, monkeypatch):
    """A stretch handed on in the middle of DCP's save (a flush between its items) moves none of the offsets
    DCP records: the shards load back equal, and their checksums are the files' own."""
    monkeypatch.setattr(fileio, "WRITEBACK_CHUNK", 4096)
    writer = dcp.FileSystemWriter(tmp_path, sync_files=True)
    writer.fs = HashingFileSystem()
    state = {"w": torch.randn(64, 32), "b": torch.arange(7), "v": torch.randn(3000)}
    dcp.save(state, storage_writer=writer, no_dist=True)
    for path, digest in writer.fs.digests.items():
        assert digest == on_disk(path), path.name
    loaded = {"w": torch.empty(64, 32), "b": torch.empty(7, dtype=torch.int64), "v": torch.empty(3000)}
    dcp.load(loaded, checkpoint_id=tmp_path, no_dist=True)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_rank_vouches_for_its_files_by_their_place_in_the_shards_folder(tmp_path):
    partial = tmp_path / "step-00000007.partial"
    digest = FileDigest(DEFAULT_CHECKSUM, "ab", 2)
    written = {partial / SHARDS_DIR / "__1_0.distcp": digest, partial / SHARDS_DIR / ".metadata": digest}
    assert shard_entries(written, partial) == {
        f"{SHARDS_DIR}/__1_0.distcp": {DEFAULT_CHECKSUM: "ab", "bytes": 2},
        f"{SHARDS_DIR}/.metadata": {DEFAULT_CHECKSUM: "ab", "bytes": 2},
    }
    with pytest.raises(CheckpointCorruptError, match="not all of it in .*not committing step-00000007.partial"):
        shard_entries({**written, partial / "__1_0.distcp": digest}, partial)
