"""Champion and challenger through the asset graph: promotion, refusal, keeping, and ``clipopt rollback``.

The challenger's per-query scores come from the evaluation report's ``reports/per_query.parquet``; the
test edits them (all queries 0 or 1 on I2I mAP) to make the challenger certainly worse or better than
the champion, whose scores are the report's own while its weights are still published, and measured
afresh on the current split once its stage was retrained.
"""
from __future__ import annotations

import json

import dagster as dg
import polars as pl

from clipopt_core.cli.main import main as clipopt
from clipopt_core.layout import Keys, served_model_key
from clipopt_core.runtime.catalog import SERVED_HISTORY, Catalog
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.serve.champion import current
from clipopt_core.serve.search import SearchService
from clipopt_core.runtime.digest import frame_digest
from clipopt_dagster.partitions import ALL_SHARDS_TAGS
from tests.pipeline.conftest import TINY_TRAIN, tiny_resources, tiny_run_config

SERVING = ["gallery_embeddings", "faiss_index"]


def _config(variant: str, selection: list[str] | None = None) -> dict:
    """The tiny run config serving ``variant`` with permissive report checks (only ``selection``'s ops)."""
    ops = tiny_run_config(evaluation_report={"config": {"templates": "short", "serve_variant": variant,
                                                        "alignment_tolerance": 1.0, "min_i2i_gain": -1.0}})["ops"]
    return {"ops": {name: value for name, value in ops.items() if selection is None or name in selection}}


def _set_i2i(store: ArtifactStore, variant: str, score: float) -> None:
    table = store.read_parquet(Keys.per_query)
    hit = (pl.col("variant") == variant) & (pl.col("metric") == "i2i_map")
    store.write_parquet(Keys.per_query, table.with_columns(pl.when(hit).then(score).otherwise(pl.col("score")).alias("score")))


def _decision(result: dg.ExecuteInProcessResult) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node("served_model")[0].metadata.items()}


def test_promote_refuse_keep_and_roll_back(tmp_path, shapes_source, caption_source, all_assets, monkeypatch, capsys):
    monkeypatch.setenv("CLIPOPT_CACHE", str(tmp_path / "cache"))
    resources = tiny_resources(tmp_path, shapes_source, caption_source)
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")

    def run(variant: str, selection: list[str]) -> dg.ExecuteInProcessResult:
        return dg.materialize(all_assets, resources=resources, run_config=_config(variant, selection),
                              instance=instance, selection=selection, tags=ALL_SHARDS_TAGS)

    with dg.instance_for_test() as instance:
        first = dg.materialize(all_assets, resources=resources, run_config=_config("mcip_realign"), instance=instance,
                               tags=ALL_SHARDS_TAGS)
        assert _decision(first)["decision"] == "promoted: the first model to pass the report checks"
        champion = current(store)
        assert champion.variant == "mcip_realign" and champion.model_key == served_model_key(store, "mcip_realign")
        test = store.read_parquet(Keys.splits).filter(pl.col("split") == "test")
        assert champion.data_fingerprint == frame_digest(test)
        assert champion.report_id == json.loads(store.read_bytes(Keys.report_json))["run_id"]

        run("stage1", ["evaluation_report"])
        _set_i2i(store, "stage1", 0.0)  # a challenger that lost every I2I query
        refused = _decision(run("stage1", ["served_model", *SERVING]))
        assert refused["promoted"] is False and "significantly worse than the champion on i2i_map" in refused["decision"]
        assert refused["champion_measured_afresh"] is False  # its weights are still published: the report's scores
        assert current(store) == champion
        assert SearchService.from_store(store, tmp_path / "cache").identity.model_key == champion.model_key

        _set_i2i(store, "stage1", 1.0)  # the same challenger, now perfect on I2I
        promoted = _decision(run("stage1", ["served_model", *SERVING]))
        assert promoted["promoted"] is True and promoted["decision"].startswith("promoted:")
        assert current(store).variant == "stage1"
        assert SearchService.from_store(store, tmp_path / "cache").identity.model_key == served_model_key(store, "stage1")

        kept = _decision(run("stage1", ["served_model"]))
        assert kept["promoted"] is False and kept["decision"].startswith("kept:")

        # stage 1 retrained: the champion's archived weights are no longer what the report measured
        retrain = _config("mcip", ["retrieval_encoder", "evaluation_report"])
        retrain["ops"]["retrieval_encoder"] = {"config": {**TINY_TRAIN, "lr": 1e-3}}
        assert dg.materialize(all_assets, resources=resources, run_config=retrain, instance=instance,
                              selection=["retrieval_encoder", "evaluation_report"]).success
        assert served_model_key(store, "stage1") != current(store).model_key
        _set_i2i(store, "mcip", 0.0)
        afresh = _decision(run("mcip", ["served_model"]))
        assert afresh["champion_measured_afresh"] is True and afresh["decision"].startswith("refused:")
        assert current(store).variant == "stage1"

        # a new test split without a new report: the report's scores are not about it, so nothing is decided
        resplit = tiny_run_config(image_splits={"config": {"val_fraction": 0.25, "test_fraction": 0.3, "seed": 1}})
        assert dg.materialize(all_assets, resources=resources, instance=instance, selection=["image_splits"],
                              run_config={"ops": {"image_splits": resplit["ops"]["image_splits"]}}).success
        stale = dg.materialize(all_assets, resources=resources, instance=instance, selection=["served_model"],
                               raise_on_error=False)
        failure = next(e for e in stale.all_events if e.event_type_value == "STEP_FAILURE")
        assert "measured on another test split" in str(failure.event_specific_data.error)
        assert current(store).variant == "stage1"

    catalogue = str(tmp_path / "catalogue.duckdb")
    assert clipopt(["rollback", "--store", store.base_url, "--catalogue", catalogue]) == 0
    assert current(store) == champion  # the archived mcip_realign weights serve again
    service = SearchService.from_store(store, tmp_path / "cache")
    assert service.identity.model_key == champion.model_key and service.variant == "mcip_realign"
    history = Catalog(catalogue).read(SERVED_HISTORY, "decided_at")
    assert history["action"].to_list() == ["promote", "refused", "promote", "kept", "refused", "rollback"]
    assert history["champion_model_key"].to_list()[-1] == champion.model_key
    assert clipopt(["rollback", "--store", store.base_url, "--catalogue", catalogue, "--to", "stage1:0"]) == 2
    capsys.readouterr()
    assert clipopt(["rollback", "--list", "--catalogue", catalogue]) == 0
    listing = capsys.readouterr().out
    assert listing.count("| promote |") == 2 and champion.weights_sha256[:12] in listing
