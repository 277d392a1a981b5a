"""The raw_images asset: the listing written in one batched pass and published whole, versioned by the same
fingerprint as the sensor's; a failure mid-listing publishes nothing."""
import dagster as dg
import polars as pl
import pytest

from clipopt_core.data import manifest as mf
from clipopt_core.data import sources as src
from clipopt_core.layout import Keys
from clipopt_core.runtime.storage import ArtifactStore
from tests.conftest import write_shapes_source
from tests.pipeline.conftest import tiny_resources
from tests.reliability.conftest import assets_named


def test_raw_images_publishes_the_listing_whole_or_not_at_all(tmp_path, monkeypatch: pytest.MonkeyPatch):
    source = write_shapes_source(tmp_path / "shapes", per_class=2, layout="folders")
    resources, store = tiny_resources(tmp_path, source, None), ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    first = dg.materialize(assets_named("raw_images"), resources=resources)
    published = store.read_bytes(Keys.listing)
    assert pl.read_parquet(published).equals(src.scan_images(str(source)))
    version = first.asset_materializations_for_node("raw_images")[0].tags["dagster/data_version"]
    assert version == src.fingerprint(str(source), cache_dir=tmp_path / "cache")
    metadata = {k: v.value for k, v in first.asset_materializations_for_node("raw_images")[0].metadata.items()}
    assert (metadata["rows"], metadata["labels"]) == (32, 16)

    def failing(*args, **kwargs):
        raise RuntimeError("killed mid-listing")

    (source / "red_circle/9.png").write_bytes((source / "blue_cross/0.png").read_bytes())  # a new image
    monkeypatch.setattr(mf, "fingerprint_rows", failing)
    failed = dg.materialize(assets_named("raw_images"), resources=resources, raise_on_error=False)
    assert not failed.success and store.read_bytes(Keys.listing) == published
    assert store.list_temp_objects() == [] and not list((tmp_path / "cache").glob("raw-images-*"))
