"""The DuckDB catalogue: report history and served-model history, one file shared by Dagster and the CLI.

DuckDB locks the file per process (one writer, or any number of read-only readers), so a connection
that finds it locked is retried with exponential backoff (50 ms doubling to 1 s, jittered) for up to
``lock_timeout_s`` seconds, then fails with :class:`CatalogBusyError` naming the holder. Connections
are held only for the few statements of each call.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import polars as pl

REPORT_HISTORY = "report_history"
SERVED_HISTORY = "served_models"


class CatalogBusyError(RuntimeError):
    """The catalogue file stayed locked by another process for longer than ``lock_timeout_s``."""


@dataclass(frozen=True)
class Catalog:
    """A DuckDB file of append-only tables (``path``; created on first write)."""

    path: str
    lock_timeout_s: float = 60.0

    def append(self, table: str, frame: pl.DataFrame) -> int:
        """Append ``frame`` to ``table`` (created on first use); returns the table's row count.

        Columns the table lacks (a newer writer) are added first, so older rows read ``NULL`` there;
        columns the frame lacks stay ``NULL`` too.
        """
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self.connect(read_only=False) as connection:
            connection.register("incoming", frame.to_arrow())
            connection.execute(f"CREATE TABLE IF NOT EXISTS {table} AS SELECT * FROM incoming LIMIT 0")
            existing = {row[0] for row in connection.execute(f"DESCRIBE {table}").fetchall()}
            for name, kind, *_ in connection.execute("DESCRIBE incoming").fetchall():
                if name not in existing:
                    quoted = '"' + name.replace('"', '""') + '"'
                    connection.execute(f"ALTER TABLE {table} ADD COLUMN {quoted} {kind}")
            connection.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
            return int(connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def read(self, table: str, order_by: str) -> pl.DataFrame:
        """All rows of ``table`` ordered by ``order_by``; an empty frame when the file or table does not exist."""
        if not Path(self.path).exists():
            return pl.DataFrame()
        with self.connect(read_only=True) as connection:
            known = {row[0] for row in connection.execute("SHOW TABLES").fetchall()}
            if table not in known:
                return pl.DataFrame()
            return connection.sql(f"SELECT * FROM {table} ORDER BY {order_by}").pl()  # duckdb 2: not execute().pl()

    def connect(self, *, read_only: bool) -> duckdb.DuckDBPyConnection:
        """Open the file, retrying while another process holds a conflicting lock."""
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.05
        while True:
            try:
                return duckdb.connect(self.path, read_only=read_only)
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CatalogBusyError(
                        f"catalogue {self.path} stayed locked for {self.lock_timeout_s:.0f}s: {exc}. Another process "
                        "(named above) holds it; close it, or raise CatalogResource.lock_timeout_s."
                    ) from exc
                time.sleep(min(delay * random.uniform(0.5, 1.0), remaining))
                delay = min(delay * 2, 1.0)
