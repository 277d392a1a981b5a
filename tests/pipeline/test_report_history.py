"""The DuckDB report history keeps every run, also when a newer report brings new (interval) columns."""
import math

import polars as pl

from clipopt_dagster.resources import CatalogResource


def test_history_grows_new_interval_columns_and_keeps_old_rows(tmp_path):
    catalog = CatalogResource(path=str(tmp_path / "catalogue.duckdb"))
    old = pl.DataFrame({"variant": ["baseline", "stage1"], "i2i_map": [0.2, 0.3], "run_id": ["r1", "r1"]})
    assert catalog.append_report(old) == 2
    new = pl.DataFrame({"variant": ["baseline", "stage1"], "i2i_map": [0.21, 0.33], "i2i_map_lo": [0.19, 0.30],
                        "i2i_map_hi": [0.23, 0.36], "delta_i2i_map_lo": [0.0, 0.08], "run_id": ["r2", "r2"]})
    assert catalog.append_report(new) == 4
    history = catalog.history()
    assert set(new.columns) <= set(history.columns)
    rows = {(r["run_id"], r["variant"]): r for r in history.iter_rows(named=True)}
    assert rows[("r2", "stage1")]["delta_i2i_map_lo"] == 0.08 and rows[("r2", "stage1")]["i2i_map_hi"] == 0.36
    assert rows[("r1", "stage1")]["i2i_map_lo"] is None  # older rows: NULL where the column did not exist
    assert catalog.append_report(old.with_columns(pl.lit("r3").alias("run_id"))) == 6  # fewer columns: fine too
    nan_row = pl.DataFrame({"variant": ["baseline"], "t2i_r5": [math.nan], "run_id": ["r4"]})
    assert catalog.append_report(nan_row) == 7
