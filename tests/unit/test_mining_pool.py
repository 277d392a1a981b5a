"""Mining from a pool stored as parquet: read in chunks, the same table as the in-memory pool, only the
kept ids' texts read back, a changed file gives the new captions."""
from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipopt_core.data.captions import dedupe_texts
from clipopt_core.data.manifest import ingest, scan_source
from clipopt_core.models.encode import embed_texts
from clipopt_core.models.loading import ClipBundle, ModelSpec, load_model
from clipopt_core.runtime.storage import ArtifactStore, StorageError
from clipopt_core.train import mining
from clipopt_core.train.config import MiningConfig
from clipopt_core.train.mining import mine_captions
from clipopt_core.train.text_pool import InMemoryPool, ParquetPool, open_stored_pool


def write_pool(path: Path, texts: list[str], row_group_size: int, column: str = "text") -> Path:
    """``texts`` as one string column of a parquet file in row groups of ``row_group_size`` rows."""
    pq.write_table(pa.table({column: pa.array(texts, type=pa.string())}), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ClipBundle:
    return load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def train(shapes_source: Path) -> pl.DataFrame:
    return ingest(str(shapes_source), scan_source(str(shapes_source))).accepted


@pytest.fixture(scope="module")
def raw_pool(caption_source: Path, train: pl.DataFrame) -> list[str]:
    """Corpus captions and the images' own captions: repeats and stray whitespace included."""
    captions = pl.read_csv(caption_source / "manifest.csv")["caption"].to_list()
    return captions + train["caption"].to_list() + [f"  {captions[0]}  ", captions[1]]


@pytest.mark.parametrize("top_k, row_group_size", [(3, 5), (20, 4)])
def test_parquet_pool_mines_the_same_table_as_the_list(bundle: ClipBundle, train: pl.DataFrame, raw_pool: list[str],
                                                       tmp_path: Path, monkeypatch, top_k: int, row_group_size: int) -> None:
    """Same ids, texts, similarities and threshold, with chunks (8) crossing the file's row groups;
    top_k 20 is larger than the pool of 5 texts of the second case."""
    distinct = dedupe_texts(raw_pool)
    raw = raw_pool if top_k == 3 else distinct[:5]
    file_texts = distinct if top_k == 3 else distinct[:5]
    config = MiningConfig(top_k=top_k, threshold=None, threshold_quantile=0.3, chunk_size=8)
    expected, expected_stats = mine_captions(bundle, train, raw, config)

    sizes: list[int] = []

    def recording_embed(bundle, texts, **kwargs):
        sizes.append(len(texts))
        return embed_texts(bundle, texts, **kwargs)

    monkeypatch.setattr(mining, "embed_texts", recording_embed)
    with ParquetPool(write_pool(tmp_path / "pool.parquet", file_texts, row_group_size)) as pool:
        table, stats = mine_captions(bundle, train, pool, config)
    assert table.equals(expected) and stats == expected_stats
    assert sizes == [min(8, len(file_texts) - start) for start in range(0, len(file_texts), 8)]
    assert table.group_by("image_id").len()["len"].max() <= min(top_k, len(file_texts))
    assert set(table["caption"]) <= set(file_texts)


def test_chunks_have_the_requested_size_across_row_groups(tmp_path: Path) -> None:
    texts = [f"caption {i}" for i in range(23)]
    with ParquetPool(write_pool(tmp_path / "pool.parquet", texts, row_group_size=7)) as pool:
        assert len(pool) == 23
        chunks = list(pool.chunks(5))
    assert [len(chunk) for chunk in chunks] == [5, 5, 5, 5, 3]
    assert sum(chunks, []) == texts == sum(InMemoryPool(texts).chunks(5), [])


def test_lookup_reads_only_the_row_groups_holding_the_ids(tmp_path: Path, monkeypatch) -> None:
    texts = [f"caption {i}" for i in range(50)]
    groups_read: list[list[int]] = []
    iter_batches = pq.ParquetFile.iter_batches

    def recording(self, *args, row_groups=None, **kwargs):
        groups_read.append(row_groups)
        return iter_batches(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    with ParquetPool(write_pool(tmp_path / "pool.parquet", texts, row_group_size=10), batch_rows=4) as pool:
        assert pool.texts([42, 3, 3, 17, 49]) == ["caption 42", "caption 3", "caption 3", "caption 17", "caption 49"]
        assert groups_read == [[0], [1], [4]]
        groups_read.clear()
        assert pool.texts([]) == [] and groups_read == []
        assert pool.texts([0, 9, 10]) == ["caption 0", "caption 9", "caption 10"]  # a group's first and last rows
        assert groups_read == [[0], [1]]
        with pytest.raises(IndexError, match="50"):
            pool.texts([50])


def test_a_pool_file_changed_between_runs_gives_the_new_captions(bundle: ClipBundle, train: pl.DataFrame,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "pool.parquet"
    config = MiningConfig(top_k=2, threshold=-1.0, chunk_size=3)
    old = [f"a photo of a {colour} shape" for colour in ("red", "green", "blue", "yellow")]
    new = [f"a drawing of a {shape}" for shape in ("circle", "square", "triangle", "star", "moon")]
    with ParquetPool(write_pool(path, old, row_group_size=2)) as pool:
        first, _ = mine_captions(bundle, train, pool, config)
        write_pool(tmp_path / "next.parquet", new, row_group_size=2)
        os.replace(tmp_path / "next.parquet", path)  # published while this pool is still open
        assert sum(pool.chunks(3), []) == old and pool.texts([3]) == [old[3]]  # one consistent snapshot
    with ParquetPool(path) as pool:
        second, stats = mine_captions(bundle, train, pool, config)
    assert set(first["caption"]) <= set(old) and set(second["caption"]) <= set(new)
    assert second.height == 2 * train.height and stats["pool_size"] == len(new)


@pytest.mark.parametrize("texts, problem", [
    (["a cat", "a dog", "a cat"], "row 2: 'a cat' repeats"),
    (["a cat", "a  dog"], "row 1: 'a  dog' is not a non-empty, whitespace-normalised"),
    (["a cat", ""], "row 1"),
    (["a cat", None], "row 1: None"),
])
def test_a_file_that_is_not_a_deduplicated_pool_is_refused(tmp_path: Path, texts: list, problem: str) -> None:
    with ParquetPool(write_pool(tmp_path / "pool.parquet", texts, row_group_size=2)) as pool:
        with pytest.raises(ValueError, match=problem):
            list(pool.chunks(8))


def test_a_missing_column_names_the_columns(tmp_path: Path) -> None:
    path = write_pool(tmp_path / "pool.parquet", ["a cat"], row_group_size=1, column="caption")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['caption'\]"):
        ParquetPool(path, "text")
    with ParquetPool(path, "caption") as pool:
        assert pool.texts([0]) == ["a cat"]


@pytest.mark.parametrize("url", ["local", "memory://mining-pool-test"])
def test_stored_pool_is_read_in_place_or_from_a_local_copy(tmp_path: Path, url: str) -> None:
    """A local store is read in place; another (memory:// standing in for S3) from a temporary local copy,
    removed afterwards; a pool stored again is read anew."""
    store = ArtifactStore(str(tmp_path / "store") if url == "local" else url)
    workdir = tmp_path / "work"
    workdir.mkdir()
    for texts in (["a cat", "a dog", "a bird"], ["a kite", "a boat"]):
        store.write_parquet("data/caption_pool.parquet", pl.DataFrame({"text": texts}))
        with open_stored_pool(store, "data/caption_pool.parquet", workdir=workdir) as pool:
            assert sum(pool.chunks(2), []) == texts and pool.texts([1]) == [texts[1]]
            local = pool.path
            assert (local == Path(store.path("data/caption_pool.parquet"))) == (url == "local")
        assert local.exists() == (url == "local") and list(workdir.iterdir()) == []
    with pytest.raises((StorageError, FileNotFoundError), match="missing.parquet"):
        with open_stored_pool(store, "data/missing.parquet", workdir=workdir):
            pass
    assert list(workdir.iterdir()) == []
