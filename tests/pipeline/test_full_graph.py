"""Materialise every asset (and run every check) in-process on tiny data with the tiny model."""
import json
import shutil

import dagster as dg
import numpy as np
import polars as pl

from clipopt_core.models.encode import embed_images
from clipopt_core.layout import Keys
from clipopt_core.evaluate.report import VARIANTS
from clipopt_core.serve.search import SearchService
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_dagster.assets_serving import faiss_index, gallery_embeddings
from clipopt_dagster.checks import index_recall
from clipopt_dagster.definitions import SUITE_ASSETS, defs
from clipopt_dagster.partitions import ALL_SHARDS_TAGS
from tests.pipeline.conftest import tiny_resources, tiny_run_config


def test_full_graph_materialises_with_reports(tmp_path, shapes_source, caption_source, all_assets):
    resources = tiny_resources(tmp_path, shapes_source, caption_source)
    result = dg.materialize(all_assets, resources=resources, run_config=tiny_run_config(), tags=ALL_SHARDS_TAGS)
    assert result.success
    materialised = {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}
    expected = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    suite = {key.to_user_string() for assets in SUITE_ASSETS for key in assets.keys}  # test_benchmark_suite_assets.py
    assert materialised == expected - suite and suite

    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    report = store.read_parquet("reports/evaluation.parquet")
    assert report["variant"].to_list() == list(VARIANTS)
    for column in ("i2i_map", "knn_top1", "zs_top1", "t2i_r1", "t2i_r5", "t2i_r10", "delta_i2i_map"):
        assert report[column].is_not_null().all(), column
    assert report.filter(pl.col("variant") == "baseline")["delta_i2i_map"][0] == 0.0
    assert store.read_bytes("reports/teaser.png")[:4] == b"\x89PNG"
    assert store.read_bytes("reports/gallery.png")[:4] == b"\x89PNG"
    assert store.read_bytes(Keys.gallery_t2i)[:4] == b"\x89PNG"
    for column in ("t2i_r5_lo", "t2i_r5_hi", "delta_i2i_map_lo", "delta_avg_hi", "t2i_cls_r5", "avg"):
        assert column in report.columns, column
    pairs = store.read_parquet(Keys.caption_pairs)
    assert set(pairs["split"]) == {"train", "val", "test"}
    assert json.loads(store.read_bytes(Keys.report_json))["test_caption_pairs"] == pairs.filter(pl.col("split") == "test").height
    pool = set(store.read_parquet(Keys.caption_pool)["text"])
    assert not pool & set(pairs.filter(pl.col("split") != "train")["caption"])  # held-out captions never mined
    assert store.list_temp_objects() == []

    report_meta = result.asset_materializations_for_node("evaluation_report")[0].metadata
    assert "| mcip_realign |" in report_meta["report"].value
    assert report_meta["teaser"].value.startswith("![I2I vs T2I](data:image/png;base64,")

    checks = {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}
    assert set(checks) == {"manifest_valid", "alignment_preserved", "retrieval_improved", "index_recall"}
    assert all(checks.values()), checks

    weights = {name: result.asset_materializations_for_node(name)[0].metadata["weights_sha256"].value
               for name in ("retrieval_encoder", "realigned_2sft", "mcip_encoder", "realigned_mcip")}
    assert len(set(weights.values())) == 4, weights  # every stage trained something of its own

    shards = result.asset_materializations_for_node("gallery_embeddings")
    assert sorted(event.partition for event in shards) == ["00000", "00001", "00002", "00003"]
    assert_served_index_equals_unsharded(store, tmp_path / "cache")
    again = dg.materialize([gallery_embeddings], resources=resources, partition_key="00002")
    assert again.asset_materializations_for_node("gallery_embeddings")[0].metadata["embedded_shards"].value == 0

    # what a backfill does: every shard in a run of its own, then the index over all of them
    shutil.rmtree(tmp_path / "artifacts" / "serving")
    for key in ("00000", "00001", "00002", "00003"):
        run = dg.materialize([gallery_embeddings], resources=resources, partition_key=key)
        assert run.asset_materializations_for_node("gallery_embeddings")[0].metadata["embedded_shards"].value == 1
    assert dg.materialize([faiss_index, index_recall], resources=resources,
                          run_config={"ops": {"faiss_index": tiny_run_config()["ops"]["faiss_index"]}}).success
    assert_served_index_equals_unsharded(store, tmp_path / "cache")
    sidecar = json.loads((tmp_path / "cache" / "checkpoints" / "models" / "realigned_mcip" / "clipopt.json").read_text())
    assert sidecar["stage"] == "realigned_mcip" and sidecar["base_model"]["name"].startswith("local-dir:")


def test_failed_blocking_check_keeps_the_index_unpublished(tmp_path, shapes_source, caption_source, all_assets):
    """Serving the baseline cannot beat the baseline: retrieval_improved fails and blocks embeddings + index."""
    config = tiny_run_config(evaluation_report={"config": {"templates": "short", "serve_variant": "baseline",
                                                          "min_i2i_gain": 0.0}})
    result = dg.materialize(all_assets, resources=tiny_resources(tmp_path, shapes_source, caption_source),
                            run_config=config, raise_on_error=False, tags=ALL_SHARDS_TAGS)
    assert not result.success
    materialised = {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}
    assert "evaluation_report" in materialised
    assert not {"gallery_embeddings", "faiss_index"} & materialised
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    assert not store.exists(Keys.index)


def assert_served_index_equals_unsharded(store: ArtifactStore, cache) -> None:
    """The index merged from 4 shards answers like one exact index over the whole manifest embedded at once."""
    service = SearchService.from_store(store, cache_dir=cache)
    manifest = store.read_parquet(Keys.manifest)
    assert sorted(service.metadata["image_id"]) == sorted(manifest["image_id"])
    vectors = embed_images(service.bundle, manifest["uri"].to_list()).numpy()
    k = 10
    exact = np.argsort(-(vectors @ vectors.T), axis=1, kind="stable")[:, :k]
    _, served = service.index.search(vectors, k)
    row_of = {image_id: row for row, image_id in enumerate(manifest["image_id"])}
    served_rows = np.vectorize(lambda i: row_of[service.metadata["image_id"][int(i)]])(served)
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(exact, served_rows)])
    assert overlap >= 0.99, overlap
    info = json.loads(store.read_bytes(Keys.index_info))
    assert info["n"] == manifest.height and info["num_shards"] == 4
