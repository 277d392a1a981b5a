"""A parquet file written a batch at a time and published whole: what the batched ingest and listing write."""
from __future__ import annotations

from pathlib import Path

import polars as pl

from clipopt_core.data.file_facts import write_atomically


class PartsWriter:
    """A parquet file written a frame at a time: each frame a part in ``work``; :meth:`publish` joins the
    parts into one file (polars' streaming engine: bounded memory) under a temporary name, then renames it.

    ``row_group``: rows per row group of the published file; the sink buffers one group (its default,
    262,144 rows, would be ~75 MB of listing rows), and a reader of a slice reads the groups it spans.
    """

    def __init__(self, final: Path, schema: dict[str, pl.DataType], work: Path, row_group: int) -> None:
        self.final, self.schema, self.row_group = final, schema, row_group
        self.folder = work / final.name
        self.folder.mkdir()
        self.parts: list[Path] = []

    def write(self, frame: pl.DataFrame) -> None:
        if frame.height:
            self.parts.append(self.folder / f"{len(self.parts):06d}.parquet")
            frame.cast(self.schema).write_parquet(self.parts[-1])  # type: ignore[arg-type]

    def rows(self) -> pl.LazyFrame:
        """Every row written so far, as a lazy scan of the parts."""
        return pl.scan_parquet(self.parts) if self.parts else pl.LazyFrame(schema=self.schema)

    def publish(self) -> None:
        write_atomically(self.final, lambda path: self.rows().sink_parquet(path, row_group_size=self.row_group))
