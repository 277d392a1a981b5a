"""A caption corpus in webdataset tar shards through the graph: caption_corpus → pseudo_captions → realigned_2sft.

The same pairs as the manifest-based caption source, written as two tar shards, give the same
caption corpus content (captions, splits, image hashes), feed mining from the shards, and realign
from the disk embedding cache; a re-run reuses the realignment and its cached embeddings.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.layout import Keys
from clipopt_core.train.embedding_cache import CACHE_FOLDER
from clipopt_dagster.assets_data import base_model, caption_corpus, image_manifest, image_splits, pseudo_captions, raw_images
from clipopt_dagster.assets_training import TRAINING_ASSETS
from tests.pipeline.conftest import tiny_resources, tiny_run_config

pytestmark = pytest.mark.slow  # trains stage 1 and one realignment on tiny data (~30 s on 2 cores)
STAGES = [asset for asset in TRAINING_ASSETS if asset.key.path[-1] in ("retrieval_encoder", "realigned_2sft")]
GRAPH = [raw_images, image_manifest, image_splits, caption_corpus, base_model, pseudo_captions, *STAGES]


def write_caption_shards(manifest_source: Path, folder: Path, per_shard: int = 10) -> Path:
    """The pairs of a manifest caption source as ``<key>.png`` + ``<key>.txt`` samples in tar shards."""
    folder.mkdir(parents=True)
    rows = pl.read_csv(manifest_source / "manifest.csv").rows(named=True)
    for shard, start in enumerate(range(0, len(rows), per_shard)):
        with tarfile.open(folder / f"pairs-{shard:03d}.tar", "w") as tar:
            for number, row in enumerate(rows[start:start + per_shard], start=start):
                for ext, data in (("png", (manifest_source / row["path"]).read_bytes()), ("txt", row["caption"].encode())):
                    info = tarfile.TarInfo(f"{number:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def run(tmp: Path, images: Path, captions: Path) -> dg.ExecuteInProcessResult:
    names = {asset.key.path[-1] for asset in GRAPH}
    config = {"ops": {name: op for name, op in tiny_run_config()["ops"].items() if name in names}}
    result = dg.materialize(GRAPH, resources=tiny_resources(tmp, images, captions), run_config=config)
    assert result.success
    return result


def test_tar_shard_captions_mine_and_realign(tmp_path: Path, shapes_source: Path, caption_source: Path) -> None:
    shards = write_caption_shards(caption_source, tmp_path / "shards")
    tmp = tmp_path / "run"
    result = run(tmp, shapes_source, f"{shards}/pairs-{{000..002}}.tar")
    store = ArtifactStore(f"file://{tmp / 'artifacts'}")
    pairs = store.read_parquet(Keys.caption_pairs)
    assert pairs.height == 24 and pairs["uri"].str.contains(r"pairs-00\d\.tar#\d{5}\.png@\d+\+\d+$").all()

    from_manifest = run(tmp_path / "manifest-run", shapes_source, caption_source)
    manifest_pairs = ArtifactStore(f"file://{tmp_path / 'manifest-run' / 'artifacts'}").read_parquet(Keys.caption_pairs)
    assert pairs.drop("uri").equals(manifest_pairs.drop("uri"))  # same content, same split, same image hashes
    version = {r: r.asset_materializations_for_node("caption_corpus")[0] for r in (result, from_manifest)}
    assert len({event.tags.get("dagster/data_version") for event in version.values()}) == 1

    assert store.read_parquet(Keys.pseudo_captions)["caption"].is_in(
        store.read_parquet(Keys.caption_pool)["text"].implode()).all()
    realigned = result.asset_materializations_for_node("realigned_2sft")[0].metadata
    assert realigned["reused"].value is False and realigned["pairs"].value >= 24
    entries = list((tmp / "cache" / CACHE_FOLDER).iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").exists()

    again = run(tmp, shapes_source, f"{shards}/pairs-{{000..002}}.tar")
    assert again.asset_materializations_for_node("realigned_2sft")[0].metadata["reused"].value is True
    assert list((tmp / "cache" / CACHE_FOLDER).iterdir()) == entries
