"""A variant that failed the report checks is never served, even by later runs of served_model or gallery_embeddings.

The whole tiny graph runs with ``serve_variant: baseline`` (it cannot beat itself, so
``retrieval_improved`` fails and blocks serving in that run); a second run of ``served_model`` on the
same instance refuses to crown it, and one gallery shard has no champion to embed with. After a
passing report the variant is crowned and the same shard embeds.
"""
from __future__ import annotations

import dagster as dg

from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.serve import shards as sharding
from clipopt_core.serve.champion import current
from clipopt_dagster.assets_release import served_model
from clipopt_dagster.assets_serving import gallery_embeddings
from clipopt_dagster.partitions import ALL_SHARDS_TAGS, SHARD_COUNT
from clipopt_dagster.promotion import REPORT_CHECKS
from tests.pipeline.conftest import tiny_resources, tiny_run_config


def test_report_checks_named_by_the_gate_are_the_report_checks() -> None:
    from clipopt_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    names = {key.name for key in graph.asset_check_keys if key.asset_key.to_user_string() == "evaluation_report"}
    assert names == set(REPORT_CHECKS)


def test_gallery_of_a_failed_variant_is_not_published_by_a_later_run(tmp_path, shapes_source, caption_source,
                                                                     all_assets):
    resources = tiny_resources(tmp_path, shapes_source, caption_source)
    failing = tiny_run_config(evaluation_report={"config": {"templates": "short", "serve_variant": "baseline",
                                                           "min_i2i_gain": 0.0}})
    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    with dg.instance_for_test() as instance:
        first = dg.materialize(all_assets, resources=resources, run_config=failing, raise_on_error=False,
                               tags=ALL_SHARDS_TAGS, instance=instance)
        assert not first.success
        crowning = dg.materialize([served_model], resources=resources, instance=instance, raise_on_error=False)
        assert not crowning.success and "retrieval_improved" in _failure(crowning)
        later = dg.materialize([gallery_embeddings], resources=resources, partition_key="00000", instance=instance,
                               raise_on_error=False)
        assert not later.success and "no model serves yet" in _failure(later)
        assert not store.exists(sharding.shard_key("serving", 0, SHARD_COUNT)) and current(store) is None

        passing = {"ops": {"evaluation_report": tiny_run_config()["ops"]["evaluation_report"]}}
        evaluated = dg.materialize(all_assets, resources=resources, run_config=passing, instance=instance,
                                   selection=["evaluation_report"])
        assert {e.check_name: e.passed for e in evaluated.get_asset_check_evaluations()} == dict.fromkeys(REPORT_CHECKS, True)
        crowned = dg.materialize([served_model], resources=resources, instance=instance)
        assert crowned.asset_materializations_for_node("served_model")[0].metadata["promoted"].value is True
        again = dg.materialize([gallery_embeddings], resources=resources, partition_key="00000", instance=instance)
        assert again.success and store.exists(sharding.shard_key("serving", 0, SHARD_COUNT))
        assert current(store).variant == "mcip_realign"


def _failure(result: dg.ExecuteInProcessResult) -> str:
    return str(next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data.error)
