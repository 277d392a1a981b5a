"""Webdataset-format tar shards read as a stream: grouping by key, shard lists, and broken shards."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from clipopt_core.data.tar_shards import ShardError, expand_shards, iter_samples, iter_shards, split_member_name


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"].decode()
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_members_sharing_a_key_form_one_sample(tmp_path):
    shard = write_shard(tmp_path / "a-0.tar", [{"__key__": b"x/001", "jpg": b"J1", "txt": b"a cat"},
                                               {"__key__": b"x/002", "jpg": b"J2", "txt": b"a dog", "cls": b"3"}])
    samples = list(iter_samples(str(shard)))
    assert [s["__key__"] for s in samples] == ["x/001", "x/002"]
    assert samples[0]["txt"] == b"a cat" and samples[1]["cls"] == b"3" and "cls" not in samples[0]
    assert samples[0]["__url__"] == str(shard)


def test_shard_lists_folder_range_and_concatenation(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"cc-{i:03d}.tar", [{"__key__": f"{i}".encode(), "txt": b"t"}])
    (tmp_path / "notes.txt").write_text("not a shard")
    assert expand_shards(str(tmp_path)) == [str(tmp_path / f"cc-{i:03d}.tar") for i in range(3)]
    assert expand_shards(f"{tmp_path}/cc-{{001..002}}.tar") == [str(tmp_path / "cc-001.tar"), str(tmp_path / "cc-002.tar")]
    assert [s["__key__"] for s in iter_shards(f"{tmp_path}/cc-000.tar::{tmp_path}/cc-{{001..002}}.tar")] == ["0", "1", "2"]


def test_broken_inputs_name_the_shard_or_member(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ShardError, match="bad.tar is not a readable tar"):
        list(iter_samples(str(tmp_path / "bad.tar")))
    with pytest.raises(ShardError, match="does not exist"):
        list(iter_samples(str(tmp_path / "missing.tar")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="without any .tar"):
        expand_shards(str(tmp_path / "empty"))
    with pytest.raises(ShardError, match="no '<key>.<extension>'"):
        split_member_name("README")
