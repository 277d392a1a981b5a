"""Serve only what passed (clipopt_core.serve.promotion): a staged index is promoted only at recall@10 ≥ target.

4 shards of synthetic clustered vectors are published; an exact index is built into staging and
promoted; then an IVF build with nprobe fixed at 1 and an impossible target (recall 1.0) is refused and
the served files stay byte for byte what they were; a reachable target then promotes the IVF build.
"""
from __future__ import annotations

import polars as pl
import pytest

from clipopt_core.runtime.storage import ArtifactStore
from clipopt_core.serve import shards as sharding
from clipopt_core.serve.index import IndexSpec
from clipopt_core.serve.promotion import build_and_promote, promote_if_passed, served_info
from tests.unit.test_sharding import clustered, embed_from

N, DIM, SHARDS, PREFIX = 3000, 32, 4, "serving"
SERVED = [sharding.index_key(PREFIX, name) for name in ("merged.faiss", "ids.parquet", "info.json")]


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    manifest = pl.DataFrame({"image_id": [f"img{i:06d}" for i in range(N)], "uri": [f"mem://{i}" for i in range(N)],
                             "label": [f"class{i % 40}" for i in range(N)]})
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    vectors = clustered(N, DIM, 40)
    for shard in range(SHARDS):
        sharding.embed_shard(manifest, shard, SHARDS, store, embed_from(vectors), model_key="synthetic")
    return store


def stage_and_gate(store: ArtifactStore, spec: IndexSpec):
    return build_and_promote(store, SHARDS, spec, PREFIX)[1]


def test_impossible_target_leaves_the_served_index_unchanged(store: ArtifactStore) -> None:
    assert served_info(store, PREFIX) is None
    first = stage_and_gate(store, IndexSpec(kind="flat", target_recall=0.95))
    assert first.promoted and first.recall == 1.0
    before = {key: store.read_bytes(key) for key in SERVED}

    refused = stage_and_gate(store, IndexSpec(kind="ivf_flat", nlist=64, nprobe=1, target_recall=1.0))
    assert not refused.promoted and refused.recall < 1.0 and "refused" in refused.reason
    assert {key: store.read_bytes(key) for key in SERVED} == before
    assert served_info(store, PREFIX)["kind"] == "flat"
    staged = store.read_json(sharding.index_key(PREFIX, "info.json", sharding.STAGING_FOLDER))
    assert staged["kind"] == "ivf_flat" and staged["recall_at_10"] == pytest.approx(refused.recall)

    reachable = stage_and_gate(store, IndexSpec(kind="ivf_flat", nlist=64, nprobe=1, target_recall=refused.recall))
    assert reachable.promoted
    assert served_info(store, PREFIX)["kind"] == "ivf_flat"
    assert store.read_bytes(SERVED[0]) != before[SERVED[0]]
    assert store.list_temp_objects() == []


def test_nothing_staged_is_an_error(tmp_path) -> None:
    from clipopt_core.runtime.storage import StorageError

    with pytest.raises(StorageError, match="not found"):
        promote_if_passed(ArtifactStore(f"file://{tmp_path}"), PREFIX)
