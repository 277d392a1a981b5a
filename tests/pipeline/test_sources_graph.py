"""The data assets (raw_images → image_manifest → image_splits) from webdataset tar shards and from a
two-source sources file, and stage 1 trained on the weighted sources, in-process with the tiny setup; the
retraining sensor on a warm facts cache."""
import json
import os

import dagster as dg
import polars as pl

from clipopt_core.layout import Keys
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_dagster.automation import new_images_sensor
from clipopt_dagster.resources import ComputeResource, DataSourceResource
from tests.conftest import write_shapes_source
from tests.pipeline.conftest import tiny_resources, tiny_run_config
from tests.reliability.conftest import assets_named
from tests.unit.test_sources import write_label_shards, write_noise_shards

DATA = ("raw_images", "image_manifest", "image_splits")


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(asset)[0].metadata.items()}


def test_data_assets_from_tar_shards(tmp_path, shapes_source):
    shards = write_label_shards(tmp_path / "shards", shapes_source)
    result = dg.materialize(assets_named(*DATA), resources=tiny_resources(tmp_path, shards, None),
                            run_config={"ops": {"image_splits": tiny_run_config()["ops"]["image_splits"]}})
    assert result.success
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    manifest = store.read_parquet(Keys.manifest)
    assert manifest.height == pl.read_csv(shapes_source / "manifest.csv").height
    assert manifest["uri"].str.contains(r"\.tar#\d+\.png@\d+\+\d+$").all()
    assert _metadata(result, "image_manifest")["rejected"] == 0
    splits = store.read_parquet(Keys.splits)
    assert set(splits["split"]) == {"train", "val", "test"}


def test_two_weighted_sources_through_the_data_assets_and_stage1(tmp_path, shapes_source):
    labels = pl.read_csv(shapes_source / "manifest.csv")["label"].unique().to_list()
    web = write_noise_shards(tmp_path / "web", labels, per_class=3).parent
    sources = tmp_path / "sources.yaml"
    sources.write_text(f"sources:\n  - {{name: shapes, location: {shapes_source}, weight: 1}}\n"
                       f"  - {{name: web, location: {web}, weight: 3}}\n")
    names = (*DATA, "base_model", "retrieval_encoder")
    ops = {name: op for name, op in tiny_run_config()["ops"].items() if name in names}
    result = dg.materialize(assets_named(*names), resources=tiny_resources(tmp_path, sources, None),
                            run_config={"ops": ops})
    assert result.success
    manifest_meta = _metadata(result, "image_manifest")
    assert manifest_meta["sources"] == 2 and manifest_meta["classes"] == 32  # 16 labels per source, disjoint
    assert "| web | 48 | 16 | 3.000 | 0.750 |" in manifest_meta["per_source"]
    splits = ArtifactStore(f"file://{tmp_path / 'artifacts'}").read_parquet(Keys.splits)
    assert splits.filter(pl.col("split") == "train")["source"].n_unique() == 2
    per_split = _metadata(result, "image_splits")["per_source"]
    assert "| train | shapes |" in per_split and "| train | web |" in per_split
    trained = _metadata(result, "retrieval_encoder")["per_source"]
    assert [row["source"] for row in trained] == ["shapes", "web"] and [row["share"] for row in trained] == [0.25, 0.75]
    assert json.dumps(trained)  # reported as JSON metadata


def _tick(instance: dg.DagsterInstance, cursor: str | None, resources: dict):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return new_images_sensor.evaluate_tick(context)


def test_sensor_ignores_a_touch_and_retrains_on_new_bytes(tmp_path):
    source = write_shapes_source(tmp_path / "shapes", per_class=2)
    shards = write_label_shards(tmp_path / "shards", source)
    instance = dg.DagsterInstance.ephemeral()
    for images in (source, shards):
        resources = {"sources": DataSourceResource(images=str(images), captions=None),
                     "compute": ComputeResource(cache_dir=str(tmp_path / "cache"))}
        first = _tick(instance, None, resources)
        assert len(first.run_requests) == 1
        target = images / "red_circle" / "0.png" if images == source else images / "part-000.tar"
        data = bytearray(target.read_bytes())
        os.utime(target, ns=(1, 1))  # touched: re-hashed, same content, no run
        touched = _tick(instance, first.cursor, resources)
        assert touched.run_requests == [] and "unchanged" in touched.skip_message
        # same size, other bytes (in the shard: inside its first image, after the 512-byte tar header)
        data[len(data) // 2 if images == source else 512 + 50] ^= 0xFF
        target.write_bytes(bytes(data))
        changed = _tick(instance, first.cursor, resources)
        assert len(changed.run_requests) == 1 and changed.cursor != first.cursor


def test_image_manifest_failing_midway_publishes_nothing_and_new_bytes_change_its_version(tmp_path, monkeypatch):
    from clipopt_core.data import manifest as mf

    source = write_shapes_source(tmp_path / "shapes", per_class=2)
    resources, store = tiny_resources(tmp_path, source, None), ArtifactStore(f"file://{tmp_path / 'artifacts'}")

    def version_of(result: dg.ExecuteInProcessResult) -> str:
        return result.asset_materializations_for_node("image_manifest")[0].tags["dagster/data_version"]

    first = dg.materialize(assets_named("raw_images", "image_manifest"), resources=resources)
    published = store.read_bytes(Keys.manifest)
    assert pl.read_parquet(published).height == 32
    original = mf.assemble

    def failing(*args, **kwargs):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(mf, "assemble", failing)
    failed = dg.materialize(assets_named("image_manifest"), resources=resources, raise_on_error=False)
    assert not failed.success and store.read_bytes(Keys.manifest) == published
    assert "killed mid-way" in failed.get_step_failure_events()[0].step_failure_data.error.to_string()
    assert store.list_temp_objects() == [] and not list((tmp_path / "cache").glob("image-manifest-*"))
    monkeypatch.setattr(mf, "assemble", original)
    (source / "red_circle/1.png").write_bytes((source / "blue_cross/0.png").read_bytes())  # other bytes
    again = dg.materialize(assets_named("raw_images", "image_manifest"), resources=resources)
    assert version_of(again) != version_of(first) and store.read_bytes(Keys.manifest) != published
    assert _metadata(again, "image_manifest")["rejected"] == 1  # the same bytes under another label
