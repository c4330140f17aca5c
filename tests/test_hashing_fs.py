import pytest
import torch
import torch.distributed.checkpoint as dcp

from hpcml.compute.checkpoint.hashing_fs import HashingFileSystem
from hpcml.fileio import DEFAULT_CHECKSUM, FileDigest, digest_of


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
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["nested"]["m"], state["nested"]["m"])


def test_reads_pass_through_and_partial_writes_are_refused(tmp_path):
    fs = HashingFileSystem()
    path = tmp_path / "f"
    with fs.create_stream(path, "wb") as stream:
        stream.write(b"abc")
        assert stream.tell() == 3
    with fs.create_stream(path, "rb") as stream:
        assert stream.read() == b"abc"
    assert list(fs.digests) == [path]
    with pytest.raises(ValueError, match="mode 'ab'.*fresh write"), fs.create_stream(path, "ab"):
        pass
    fs.rm_file(path)
    assert fs.digests == {} and not path.exists()
