"""Image–caption corpora in webdataset tar shards: samples, rejections, member URIs, source detection."""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clipopt_core.data.caption_shards import is_shard_source, read_caption_shards
from clipopt_core.data.datasets import load_image
from clipopt_core.data.images import decode_image
from clipopt_core.data.manifest import ManifestError
from clipopt_core.data.tar_shards import ShardError, read_member
from clipopt_core.runtime.digest import frame_digest
from tests.conftest import COLOURS, draw_shape
from tests.unit.test_tar_shards import write_shard


def png(shape: str = "circle", colour: str = "red", seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    draw_shape(shape, COLOURS[colour], seed).save(buffer, format="PNG")
    return buffer.getvalue()


def sample(key: str, image: bytes | None, caption: str | None = None, **extra: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {"__key__": key.encode()}
    if image is not None:
        out["png"] = image
    if caption is not None:
        out["txt"] = caption.encode()
    return {**out, **extra}


def test_pairs_rejections_and_shared_images(tmp_path: Path) -> None:
    cat, dog = png("circle", "red", 1), png("square", "blue", 2)
    write_shard(tmp_path / "cc-000.tar", [
        sample("a", cat, "  a red circle "),
        sample("b", cat, "a round red thing"),  # same bytes, another caption: the same image
        sample("c", dog, None, json=json.dumps({"caption": "a blue square"}).encode()),
        sample("d", dog, None),  # no caption at all
    ])
    write_shard(tmp_path / "cc-001.tar", [
        sample("e", b"not an image", "broken"),
        sample("f", None, "no image"),
        sample("g", cat, "a red circle"),  # repeated (image bytes, caption)
        sample("h", dog, "   "),
    ])
    pairs, rejected = read_caption_shards(f"{tmp_path}/cc-{{000..001}}.tar")
    assert pairs["caption"].to_list() == ["a red circle", "a round red thing", "a blue square"]
    assert pairs["uri"][0] == pairs["uri"][1] != pairs["uri"][2]
    assert pairs["uri"][0].startswith(f"{tmp_path}/cc-000.tar#a.png@")
    assert dict(zip(rejected["path"], rejected["reason"])) == {
        f"{tmp_path}/cc-000.tar#d": "missing_caption", f"{tmp_path}/cc-001.tar#e": "not_an_image",
        f"{tmp_path}/cc-001.tar#f": "missing_image", f"{tmp_path}/cc-001.tar#g": "duplicate_pair",
        f"{tmp_path}/cc-001.tar#h": "empty_caption"}


def test_member_uri_reads_exactly_the_image(tmp_path: Path) -> None:
    images = [png("triangle", "green", seed) for seed in range(3)]
    write_shard(tmp_path / "s.tar", [sample(f"k{i}", image, f"caption {i}") for i, image in enumerate(images)])
    pairs, _ = read_caption_shards(str(tmp_path / "s.tar"))
    for uri, image in zip(pairs["uri"], images):
        assert read_member(uri) == image
        np.testing.assert_array_equal(np.asarray(load_image(uri)), np.asarray(decode_image(image)))


def test_a_shard_rewritten_after_ingest_is_named(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.tar", [sample("k", png(), "a caption")])
    uri = read_caption_shards(str(tmp_path / "s.tar"))[0]["uri"][0]
    (tmp_path / "s.tar").write_bytes(b"short")
    with pytest.raises(ShardError, match="changed since it was ingested"):
        read_member(uri)


def test_compressed_shards_are_refused_with_the_fix(tmp_path: Path) -> None:
    plain = write_shard(tmp_path / "s.tar", [sample("k", png(), "a caption")])
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(ShardError, match="uncompressed"):
        read_caption_shards(str(tmp_path / "s.tar.gz"))


def test_nothing_usable_names_the_reasons(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.tar", [sample("k", b"junk", "x")])
    with pytest.raises(ManifestError, match="not_an_image"):
        read_caption_shards(str(tmp_path / "s.tar"))


def test_changed_image_bytes_change_the_corpus_digest(tmp_path: Path) -> None:
    """The caption corpus's data version (frame_digest) follows the images' content, not their location."""
    write_shard(tmp_path / "a.tar", [sample("k", png(seed=1), "a caption")])
    write_shard(tmp_path / "b.tar", [sample("k", png(seed=1), "a caption")])
    write_shard(tmp_path / "c.tar", [sample("k", png(seed=2), "a caption")])
    digests = [frame_digest(read_caption_shards(str(tmp_path / f"{name}.tar"))[0]) for name in "abc"]
    assert digests[0] == digests[1] != digests[2]


def test_shard_sources_are_told_from_manifests(tmp_path: Path) -> None:
    shards, manifest = tmp_path / "shards", tmp_path / "manifest"
    shards.mkdir()
    manifest.mkdir()
    write_shard(shards / "x.tar", [sample("k", png(), "c")])
    pl.DataFrame({"path": ["p.png"], "caption": ["c"]}).write_csv(manifest / "manifest.csv")
    (manifest / "stray.tar").write_bytes(b"")
    assert is_shard_source(str(shards)) and is_shard_source(str(shards / "x.tar"))
    assert is_shard_source(f"{shards}/x-{{0..3}}.tar") and is_shard_source(f"{shards}/x.tar::{shards}/y.tar")
    assert not is_shard_source(str(manifest)) and not is_shard_source(str(manifest / "manifest.csv"))
