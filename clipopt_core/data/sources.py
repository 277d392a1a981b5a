"""Labelled image sources beyond one folder: webdataset tar shards, and several sources with weights.

**Shards** (layout ``shards``; ``auto`` picks it for a ``.tar`` URL, a ``{a..b}`` range, a ``::`` list or
a folder of ``.tar`` files, :func:`clipopt_core.data.tar_shards.expand_shards`): a sample is
``<key>.<image ext>`` plus ``<key>.cls`` (an integer or a text label) or ``<key>.json`` with a
``"label"`` (optional ``"caption"``, ``"category"``), and an optional ``<key>.txt`` caption. Each shard is
streamed once: every image is hashed and decoded in a thread pool, and its row keeps the member's byte
range in the shard as its ``uri`` (:func:`clipopt_core.data.tar_shards.member_uri`), so training and
evaluation later read each image with one range read of the shard, local or S3, and nothing is
extracted or copied (docs/scaling.md, "Ingest and sources"). A shard's rows are cached under the
cache folder by the shard's signature (size + mtime, or ETag), so an unchanged shard is not read again.

**Sources files** (``*.yaml``, ``*.yml``, ``*.json``)::

    sources:
      - {name: gldv2, location: /data/gldv2-shards, weight: 2}
      - {name: inat, location: s3://bucket/inat/manifest.parquet, layout: manifest, weight: 1}

Each source is a folder, manifest or shard list (a relative ``location`` is relative to the file). Its
rows get ``source`` = its name and the label ``<name>/<label>``, so class ids are disjoint across sources
(``gldv2/123`` ≠ ``inat/123``). ``weight`` (all sources or none): the share of training draws of the
source, :class:`clipopt_core.data.datasets.SourceWeightedBatches`; without weights every image is drawn
once per epoch as with one source.
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import polars as pl
import yaml

from clipopt_core.data import manifest as mf
from clipopt_core.data.file_facts import (DEFAULT_WORKERS, Progress, parallel_map, read_fact, signatures,
                                         write_atomically)
from clipopt_core.data.ingest_stream import BATCH_ROWS, ingest_to_files
from clipopt_core.data.listing import ListingSummary, file_source_fingerprint, list_file_source
from clipopt_core.data.tar_shards import BRACE_RANGE, ShardError, expand_shards, iter_samples, member_uri

SOURCES_FILE_SUFFIXES = (".yaml", ".yml", ".json")
SHARD_IMAGE_EXTENSIONS = tuple(ext.lstrip(".") for ext in mf.IMAGE_EXTENSIONS)
SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
LAYOUTS = ("auto", "folders", "manifest", "shards")
SHARD_LISTINGS = "shard_listings"
DECODE_WINDOW = 256  # samples of a shard decoded together: bounds the image bytes held
LISTING_SCHEMA = {"path": pl.String, "label": pl.String, "caption": pl.String, "category": pl.String,
                  "source": pl.String, "root": pl.String, "uri": pl.String, "sha256": pl.String,
                  "width": pl.Int64, "height": pl.Int64, "reason": pl.String, "detail": pl.String}


@dataclass(frozen=True)
class SourceSpec:
    """One entry of a sources file: ``name`` (class-id prefix), ``location``, ``layout``, ``weight``."""

    name: str
    location: str
    layout: str = "auto"
    weight: float | None = None


def is_sources_file(location: str) -> bool:
    return location.lower().endswith(SOURCES_FILE_SUFFIXES)


def read_sources_file(location: str) -> list[SourceSpec]:
    """The sources of a YAML/JSON sources file, validated (unique names, layouts, weights all or none)."""
    with fsspec.open(location, "rt") as handle:
        text = handle.read()
    try:
        document = json.loads(text) if location.lower().endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise mf.ManifestError(f"sources file {location} is not valid {Path(location).suffix[1:]}: {error}") from error
    entries = document.get("sources") if isinstance(document, dict) else document
    if not isinstance(entries, list) or not entries:
        raise mf.ManifestError(f"sources file {location} needs a non-empty list 'sources' of "
                               "{name, location, layout?, weight?}")
    folder = location.rsplit("/", 1)[0] if "/" in location else "."
    specs = [_spec(entry, number, location, folder) for number, entry in enumerate(entries)]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise mf.ManifestError(f"sources file {location}: source names must be unique, got {names}")
    weighted = [spec.weight is not None for spec in specs]
    if any(weighted) and not all(weighted):
        missing = [spec.name for spec in specs if spec.weight is None]
        raise mf.ManifestError(f"sources file {location}: give every source a weight or none; {missing} have none")
    return specs


def _spec(entry: Any, number: int, location: str, folder: str) -> SourceSpec:
    if not isinstance(entry, dict) or not {"name", "location"} <= set(entry):
        raise mf.ManifestError(f"sources file {location}: entry {number} needs 'name' and 'location', got {entry!r}")
    unknown = set(entry) - {"name", "location", "layout", "weight"}
    if unknown:
        raise mf.ManifestError(f"sources file {location}: entry {entry['name']!r} has unknown keys {sorted(unknown)}")
    name, where, layout = str(entry["name"]), str(entry["location"]), str(entry.get("layout", "auto"))
    if not SOURCE_NAME.match(name):
        raise mf.ManifestError(f"sources file {location}: source name {name!r} must match {SOURCE_NAME.pattern}")
    if layout not in LAYOUTS:
        raise mf.ManifestError(f"sources file {location}: source {name!r} has layout {layout!r}; use one of {LAYOUTS}")
    weight = entry.get("weight")
    if weight is not None and (not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0):
        raise mf.ManifestError(f"sources file {location}: source {name!r} needs a positive number as weight, "
                               f"got {weight!r}")
    if "://" not in where and not where.startswith("/"):
        where = f"{folder}/{where}"
    return SourceSpec(name, where, layout, None if weight is None else float(weight))


def resolve_layout(location: str, layout: str = "auto") -> str:
    """``layout``, or for ``auto`` the layout ``location`` has (``shards``, ``manifest`` or ``folders``)."""
    if layout != "auto":
        return layout
    if location.rstrip("/").endswith(".tar") or BRACE_RANGE.search(location) or "::" in location:
        return "shards"
    fs, base = fsspec.core.url_to_fs(mf.source_root(location))
    if location.lower().endswith((".csv", ".parquet")) or any(fs.exists(f"{base}/{n}") for n in mf.MANIFEST_NAMES):
        return "manifest"
    if fs.isdir(base) and any(name.endswith(".tar") for name in fs.ls(base, detail=False)):
        return "shards"
    return "folders"


def scan_images(location: str, layout: str = "auto", *, cache_dir: Path | str | None = None,
                workers: int = DEFAULT_WORKERS) -> pl.DataFrame:
    """The rows of an image source with their ``root``: a folder/manifest, shards or a sources file.

    Shard rows carry their facts already (``uri``, ``sha256``, …, :data:`LISTING_SCHEMA`); file rows
    get theirs in :func:`ingest_listing`.
    """
    if is_sources_file(location):
        parts = [_tagged(scan_images(spec.location, spec.layout, cache_dir=cache_dir, workers=workers), spec)
                 for spec in read_sources_file(location)]
        return pl.concat(parts, how="diagonal_relaxed")
    if resolve_layout(location, layout) == "shards":
        return pl.concat([shard_listing(url, cache_dir=cache_dir, workers=workers) for url in expand_shards(location)])
    return mf.scan_source(location, layout).with_columns(pl.lit(mf.source_root(location)).alias("root"))


def _tagged(rows: pl.DataFrame, spec: SourceSpec) -> pl.DataFrame:
    """Rows of one source of a sources file: labels ``<name>/<label>``, ``source`` its name, its weight."""
    label = pl.col("label").cast(pl.String).str.strip_chars()
    prefixed = pl.when(label.is_null() | (label == "")).then(label).otherwise(pl.lit(f"{spec.name}/") + label)
    return rows.with_columns(prefixed.alias("label"), pl.lit(spec.name).alias("source"),
                             pl.lit(spec.weight, dtype=pl.Float64).alias("source_weight"))


def fingerprint(location: str, layout: str = "auto", *, cache_dir: Path | str | None = None,
                workers: int = DEFAULT_WORKERS) -> str:
    """Content fingerprint of any image source (:func:`scan_images`), cheap when the cache is warm.

    Folders and manifests: :func:`clipopt_core.data.manifest.source_fingerprint`, computed a batch of
    rows at a time (:func:`clipopt_core.data.listing.file_source_fingerprint`; one ``stat`` per
    unchanged file). Shards: each shard's content digest, kept by its signature (one ``stat``, or one
    listing per folder on S3). Sources files: the names, weights and each source's fingerprint.
    """
    if is_sources_file(location):
        parts = [(spec.name, spec.weight, fingerprint(spec.location, spec.layout, cache_dir=cache_dir, workers=workers))
                 for spec in read_sources_file(location)]
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]
    if resolve_layout(location, layout) == "shards":
        urls = expand_shards(location)
        digests = [_shard_digest(url, signature, cache_dir, workers)
                   for url, signature in zip(urls, _shard_signatures(urls))]
        return hashlib.sha256(repr(list(zip(urls, digests))).encode()).hexdigest()[:24]
    return file_source_fingerprint(location, resolve_layout(location, layout), cache_dir=cache_dir, workers=workers)


def write_listing(location: str, layout: str, target: Path, *, cache_dir: Path | str | None = None,
                  workers: int = DEFAULT_WORKERS, batch_rows: int = mf.LISTING_BATCH_ROWS) -> ListingSummary:
    """Write the rows of :func:`scan_images` to the parquet file ``target``; their count and :func:`fingerprint`.

    Folders and manifests: listed once, ``batch_rows`` rows at a time, the fingerprint computed from the
    same pass (:func:`clipopt_core.data.listing.list_file_source`; memory bounded by a batch). Shards
    and sources files: their listing, whole. ``target`` is replaced only when complete: a failure leaves
    what was there. Raises :class:`~clipopt_core.data.manifest.ManifestError` as :func:`scan_images`.
    """
    resolved = "sources" if is_sources_file(location) else resolve_layout(location, layout)
    if resolved in ("sources", "shards"):
        rows = scan_images(location, layout, cache_dir=cache_dir, workers=workers)
        digest = fingerprint(location, layout, cache_dir=cache_dir, workers=workers)
        write_atomically(target, lambda path: rows.write_parquet(path, row_group_size=batch_rows))
        return ListingSummary(rows.height, digest)
    found: list[ListingSummary] = []
    with tempfile.TemporaryDirectory(prefix="listing-", dir=target.parent) as work:
        write_atomically(target, lambda path: found.append(list_file_source(
            location, resolved, path, Path(work), cache_dir=cache_dir, workers=workers, batch_rows=batch_rows)))
    return found[0]


def ingest_listing(listing: pl.DataFrame, *, cache_dir: Path | str | None = None, workers: int = DEFAULT_WORKERS,
                   progress: Progress | None = None, batch_rows: int = BATCH_ROWS) -> mf.IngestResult:
    """Validate the rows of :func:`scan_images`: file rows are read once (per root), shard rows are checked.

    In memory, for tests and small sources: the same batched pass as the ``image_manifest`` asset
    (:func:`~clipopt_core.data.ingest_stream.ingest_to_files`, ``batch_rows`` rows at a time), on
    temporary files read back whole.
    """
    with tempfile.TemporaryDirectory(prefix="ingest-listing-") as work:
        folder = Path(work)
        listing.write_parquet(folder / "listing.parquet")
        ingest_to_files(folder / "listing.parquet", folder / "accepted.parquet", folder / "rejected.parquet",
                        batch_rows=batch_rows, cache_dir=cache_dir, workers=workers, progress=progress)
        return mf.IngestResult(pl.read_parquet(folder / "accepted.parquet"), pl.read_parquet(folder / "rejected.parquet"))


def source_counts(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """Per source: ``images``, ``classes``, ``weight`` (null without weights) and ``share`` of training draws.

    A lazy ``frame`` (a scanned manifest) is counted by polars' streaming engine: memory grows with the
    classes, not the images.
    """
    rows = frame.lazy()
    weight = pl.col("source_weight") if "source_weight" in rows.collect_schema().names() else pl.lit(None, pl.Float64)
    counts = (rows.group_by("source")
              .agg(pl.len().alias("images"), pl.col("label").n_unique().alias("classes"), weight.first().alias("weight"))
              .sort("source").collect(engine="streaming"))
    share = pl.col("weight") / pl.col("weight").sum() if counts["weight"].is_not_null().all() \
        else pl.col("images") / pl.col("images").sum()
    return counts.with_columns(share.round(4).alias("share"))


def source_weights(train: pl.DataFrame) -> tuple[list[int], list[float]] | None:
    """(source number of each row, weight of each source) for weighted sampling; ``None`` without weights."""
    if "source_weight" not in train.columns or train["source_weight"].is_null().all():
        return None
    names = sorted(train["source"].unique().to_list())
    lookup = {name: number for number, name in enumerate(names)}
    weights = dict(train.group_by("source").agg(pl.col("source_weight").first()).iter_rows())
    return [lookup[name] for name in train["source"].to_list()], [float(weights[name]) for name in names]


# -- shards --------------------------------------------------------------------------------------

def shard_listing(url: str, *, cache_dir: Path | str | None = None, workers: int = DEFAULT_WORKERS) -> pl.DataFrame:
    """The rows of one shard (:data:`LISTING_SCHEMA`), read once per shard signature."""
    folder, key = _listing_place(url, _shard_signatures([url])[0], cache_dir)
    if folder is not None and (folder / f"{key}.sha256").exists():
        return pl.read_parquet(folder / f"{key}.parquet")
    return _listed(url, folder, key, workers)[0]


def _shard_digest(url: str, signature: str | None, cache_dir: Path | str | None, workers: int) -> str:
    """The content digest of a shard's rows: a small file read when its signature is unchanged."""
    folder, key = _listing_place(url, signature, cache_dir)
    if folder is not None and (folder / f"{key}.sha256").exists():
        return (folder / f"{key}.sha256").read_text().strip()
    return _listed(url, folder, key, workers)[1]


def _listing_place(url: str, signature: str | None, cache_dir: Path | str | None) -> tuple[Path | None, str]:
    """(cache folder or ``None``, file stem) of a shard's cached rows, keyed by its URL and signature."""
    if signature is None:
        raise ShardError(f"shard {url} does not exist; check the shard list")
    key = hashlib.sha256(f"{url}\n{signature}".encode()).hexdigest()[:32]
    return (Path(cache_dir) / SHARD_LISTINGS if cache_dir is not None else None), key


def _shard_signatures(urls: list[str]) -> list[str | None]:
    """Signatures of shard URLs, one listing per folder (not one request per shard)."""
    by_folder: dict[str, list[int]] = {}
    for number, url in enumerate(urls):
        by_folder.setdefault(url.rsplit("/", 1)[0], []).append(number)
    result: list[str | None] = [None] * len(urls)
    for folder, numbers in by_folder.items():
        fs, base = fsspec.core.url_to_fs(folder)
        names = [urls[n].rsplit("/", 1)[1] for n in numbers]
        for number, signature in zip(numbers, signatures(fs, base, names)):
            result[number] = signature
    return result


def _listed(url: str, folder: Path | None, key: str, workers: int) -> tuple[pl.DataFrame, str]:
    """Read a shard; keep its rows and digest in ``folder`` (digest written last: it marks them complete)."""
    rows = _read_shard(url, workers)
    digest = mf.frame_hash(rows.select("path", "label", "caption", "category", "sha256"))
    if folder is not None:
        write_atomically(folder / f"{key}.parquet", rows.write_parquet)
        write_atomically(folder / f"{key}.sha256", lambda path: path.write_text(digest))
    return rows, digest


def _read_shard(url: str, workers: int) -> pl.DataFrame:
    """Stream one shard: labels from ``.cls``/``.json``, images hashed and decoded ``DECODE_WINDOW`` at a time."""
    columns: dict[str, list] = {name: [] for name in LISTING_SCHEMA}
    for window in _windows(iter_samples(url), DECODE_WINDOW):
        parsed = [_parse_sample(sample) for sample in window]
        facts = parallel_map(_sample_fact, parsed, workers)
        for (row, _, _), fact in zip(parsed, facts):
            for name, value in {**row, **fact}.items():
                columns[name].append(value)
    return pl.DataFrame(columns, schema=LISTING_SCHEMA)


def _windows(samples: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    window: list[dict[str, Any]] = []
    for sample in samples:
        window.append(sample)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _parse_sample(sample: dict[str, Any]) -> tuple[dict[str, Any], bytes | None, str]:
    """(row without facts, image bytes or ``None``, where) of one sample; a label problem goes in ``reason``."""
    url, key = sample["__url__"], sample["__key__"]
    ext = next((e for e in SHARD_IMAGE_EXTENSIONS if e in sample), None)
    where = f"shard {url}, key {key!r}"
    row: dict[str, Any] = {"path": f"{url}/{key}.{ext or 'image'}", "label": None, "caption": None, "category": None,
                           "source": None, "root": url, "uri": None, "reason": None, "detail": None}
    if ext is None:
        members = sorted(e for e in sample if not e.startswith("__"))
        row.update(reason="missing_image", detail=f"{where} has no image member ({members}); expected one of "
                                                  f"{list(SHARD_IMAGE_EXTENSIONS)}")
        return row, None, where
    row["uri"] = member_uri(sample, ext)  # a compressed shard raises: its members have no byte range
    meta, problem = _label_of(sample, where)
    row.update(label=meta.get("label"), category=meta.get("category"),
               caption=meta.get("caption") or (sample["txt"].decode("utf-8", "replace").strip() if "txt" in sample else None))
    if problem:
        row.update(reason=problem[0], detail=problem[1])
    return row, sample[ext], where


def _label_of(sample: dict[str, Any], where: str) -> tuple[dict[str, str | None], tuple[str, str] | None]:
    """``{"label", "category", "caption"}`` of a sample from ``.cls`` or ``.json``, or a ``(reason, detail)``."""
    if "cls" in sample:
        label = sample["cls"].decode("utf-8", "replace").strip()
        return {"label": label or None}, None if label else ("empty_label", f"{where}: its .cls is empty")
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as error:
            return {}, ("invalid_label_json", f"{where}: its .json does not parse ({error})")
        label = meta.get("label") if isinstance(meta, dict) else None
        if label is None or not str(label).strip():
            return {}, ("missing_label", f"{where}: its .json has no 'label'; add one, or a .cls member")
        text = {name: (str(meta[name]).strip() or None) if meta.get(name) is not None else None
                for name in ("category", "caption")}
        return {"label": str(label).strip(), **text}, None
    return {}, ("missing_label", f"{where} has no .cls or .json label; add one")


def _sample_fact(parsed: tuple[dict[str, Any], bytes | None, str]) -> dict[str, Any]:
    """sha256/width/height of a sample's image, or the decode ``reason`` (the detail names shard and key)."""
    row, data, where = parsed
    if data is None:
        return {"sha256": None, "width": None, "height": None}
    digest, width, height, reason, detail = read_fact(data, row["uri"])
    fact: dict[str, Any] = {"sha256": digest, "width": width, "height": height}
    if reason and row["reason"] is None:
        fact.update(reason=reason, detail=f"{where}: {detail}")
    return fact
