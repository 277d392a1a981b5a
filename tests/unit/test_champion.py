"""Champion and challenger in the core: the paired verdict, archiving a champion, and choosing a rollback target."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from clipopt_core.evaluate.bootstrap import BootstrapConfig, per_query_frame, variant_scores
from clipopt_core.layout import Keys, served_model_key
from clipopt_core.runtime.catalog import SERVED_HISTORY, Catalog
from clipopt_core.runtime.storage import ArtifactStore, StorageError, sha256_file
from clipopt_core.serve import champion as release
from clipopt_core.serve.rollback import crowned, rollback_target
from tests.serving import TINY, publish_base, publish_checkpoint, shapes_manifest

CONFIG = BootstrapConfig(resamples=500, seed=0)


def scores(i2i: list[float], t2i: list[float], zs: list[float] | None = None) -> dict[str, np.ndarray]:
    out = {"i2i_map": np.array(i2i), "t2i_r5": np.array(t2i)}
    if zs is not None:
        out["zs_top1"] = np.array(zs)
    return out


def test_a_challenger_significantly_worse_on_one_gate_metric_is_refused_and_the_metric_named():
    rng = np.random.default_rng(0)
    champion = scores(list(rng.uniform(0.6, 0.9, 200)), list(rng.integers(0, 2, 300).astype(float)))
    worse = {**champion, "i2i_map": champion["i2i_map"] - 0.1}  # every query loses 0.1 mAP
    verdict = release.judge(worse, champion, config=CONFIG)
    assert not verdict.promote and "i2i_map -0.1000" in verdict.reason and "t2i_r5" not in verdict.reason
    assert verdict.deltas["i2i_map"][2] < 0 and verdict.deltas["t2i_r5"] == (0.0, 0.0, 0.0)
    assert release.judge(worse, champion, config=CONFIG, tolerance=0.2).promote  # within the tolerance


def test_equal_or_noisy_challengers_are_promoted():
    rng = np.random.default_rng(1)
    champion = scores(list(rng.uniform(0, 1, 100)), list(rng.integers(0, 2, 100).astype(float)))
    assert release.judge(champion, champion, config=CONFIG).promote
    noisy = {**champion, "i2i_map": champion["i2i_map"] + rng.normal(0, 0.05, 100)}  # mean-zero noise per query
    verdict = release.judge(noisy, champion, config=CONFIG)
    lo, hi = verdict.deltas["i2i_map"][1:]
    assert verdict.promote == (not (hi < 0)) and lo < 0  # noise alone: the interval straddles zero here
    better = {**champion, "t2i_r5": np.ones(100)}
    assert release.judge(better, champion, config=CONFIG).promote


def test_t2i_falls_back_to_class_captions_when_no_held_out_pairs_were_measured():
    champion = {"i2i_map": np.full(50, 0.5), "t2i_r5": np.full(40, np.nan), "t2i_cls_r5": np.ones(40)}
    challenger = {**champion, "t2i_cls_r5": np.zeros(40)}
    verdict = release.judge(challenger, champion, config=CONFIG)
    assert not verdict.promote and "t2i_cls_r5" in verdict.reason and "t2i_r5" not in verdict.deltas


def test_per_query_scores_round_trip_through_the_report_table():
    table = per_query_frame({"baseline": scores([0.1, 0.2], [1.0, 0.0, 1.0]), "stage1": scores([0.3, 0.4], [0, 0, 1.0])})
    assert variant_scores(table, "stage1")["t2i_r5"].tolist() == [0, 0, 1.0]
    assert variant_scores(table, "baseline")["i2i_map"].tolist() == [0.1, 0.2]
    with pytest.raises(KeyError, match="mcip"):
        variant_scores(table, "mcip")


def test_crowning_archives_the_weights_so_a_retrain_does_not_change_what_serves(tmp_path, shapes_source):
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    publish_base(store, shapes_manifest(shapes_source), TINY)
    publish_checkpoint(store, "stage1", 1, tmp_path)
    first = release.crown(store, "stage1", data_fingerprint="f" * 64, report_id="run-1")
    assert release.current(store) == first and first.model_key == served_model_key(store, "stage1")
    archived = release.champion_spec(store, first, tmp_path / "cache")
    weights = sha256_file(archived.name.removeprefix("local-dir:") + "/open_clip_model.safetensors")
    assert first.weights_sha256 == weights

    publish_checkpoint(store, "stage1", 2, tmp_path)  # a retrain republishes models/retrieval_encoder
    assert served_model_key(store, "stage1") != first.model_key
    assert release.current(store) == first
    again = release.champion_spec(store, first, tmp_path / "cache2")
    assert sha256_file(again.name.removeprefix("local-dir:") + "/open_clip_model.safetensors") == weights
    _, key, _ = release.resolve_served(store, tmp_path / "cache")
    assert key == first.model_key  # search and embeddings follow the champion, not the newest checkpoint

    baseline = release.crown(store, "baseline", data_fingerprint="f" * 64, report_id="run-2")
    assert baseline.checkpoint is None and release.champion_spec(store, baseline, tmp_path).name == TINY.name
    store.fs.rm(store.path(f"{first.checkpoint}/_COMPLETE.json"))
    with pytest.raises(StorageError, match="cannot serve"):
        release.reinstate(store, first)
    assert release.current(store) == baseline  # a refused reinstatement leaves the champion alone


def _history(tmp_path, *events: tuple[str, str]) -> pl.DataFrame:
    catalog = Catalog(str(tmp_path / "catalogue.duckdb"))
    for at, (action, key) in enumerate(events):
        served = release.ServedModel(key.split(":")[0], key, "w" * 64, None, "fp", f"run-{at}", float(at))
        row = release.history_row(action, f"run-{at}", key, action, served).with_columns(pl.lit(float(at)).alias("decided_at"))
        catalog.append(SERVED_HISTORY, row)
    return catalog.read(SERVED_HISTORY, "decided_at")


def test_rollback_goes_to_the_champion_crowned_before_the_current_one(tmp_path):
    history = _history(tmp_path, ("promote", "baseline:a"), ("promote", "stage1:b"), ("refused", "stage1:b"),
                       ("promote", "mcip:c"))
    assert [c.model_key for c in crowned(history)] == ["baseline:a", "stage1:b", "mcip:c"]
    [a, b, c] = crowned(history)
    assert rollback_target(history, c).model_key == "stage1:b"
    assert rollback_target(history, b).model_key == "baseline:a"  # and again, one step further back
    assert rollback_target(history, c, to="baseline:a") == a
    with pytest.raises(ValueError, match="first champion"):
        rollback_target(history, a)
    with pytest.raises(ValueError, match="known: baseline:a, stage1:b, mcip:c"):
        rollback_target(history, c, to="nope:0")
    with pytest.raises(ValueError, match="nothing is served"):
        rollback_target(history, None)
    assert Catalog(str(tmp_path / "none.duckdb")).read(SERVED_HISTORY, "decided_at").is_empty()


def test_champion_scores_come_from_the_report_until_its_stage_is_retrained(tmp_path, shapes_source):
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    publish_base(store, shapes_manifest(shapes_source), TINY)
    publish_checkpoint(store, "stage1", 1, tmp_path)
    served = release.crown(store, "stage1", data_fingerprint="f" * 64, report_id="run-1")
    report = per_query_frame({"stage1": scores([0.25, 0.75], [1.0, 0.0])})
    calls: list[int] = []

    def evaluate() -> dict[str, np.ndarray]:
        calls.append(1)
        return scores([0.5, 0.5], [0.0, 0.0])

    held, afresh = release.champion_scores(store, served, report, evaluate)
    assert not afresh and calls == [] and held["i2i_map"].tolist() == [0.25, 0.75]  # the report measured these weights
    publish_checkpoint(store, "stage1", 2, tmp_path)  # its stage was retrained: the report measured other weights
    held, afresh = release.champion_scores(store, served, report, evaluate)
    assert afresh and calls == [1] and held["i2i_map"].tolist() == [0.5, 0.5]
