"""The built-in demo dataset, built at first use from images that ship in package registries.

Labelled images (``manifest.parquet``): the same emoji drawn by several vendors
(npm ``emoji-datasource-google``/``-twitter`` 16.0.0, ``openmoji`` 17.0.0, Debian
``ruby-gemojione``) — one class per emoji, its CLDR name as label and caption, its
subcategory as category — plus the Debian ``tuxpaint-stamps-default`` stamps (class from
their folder, English sentence as caption). Image-caption pairs (``captions.parquet``):
Debian ``openclipart-png`` clip art with its human title, near-duplicate groups filtered, plus
one vendor's drawing of emoji the labelled set does *not* use, with their CLDR name -- enough
pairs for a held-out text→image benchmark of 2,000+ captions (docs/method.md, "Evaluation").

Needs ``npm``, ``apt-get`` and ``dpkg-deb`` on PATH and access to their registries (about
440 MB of downloads, deleted after the build); only the images used are kept (~40 MB).
The dataset is built in a temporary folder and renamed into place, so a finished folder
is always complete; later calls with the same arguments return at once.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from clipopt_core.demo import _sources as src

__all__ = ["DemoData", "ensure_demo_data"]

_LAYOUT_VERSION = 2
_MARKER = "READY.json"
_DOWNLOAD_TIMEOUT_S = 1800.0
_EXTRACT_TIMEOUT_S = 900.0
_NPM = {"emoji-google": "emoji-datasource-google@16.0.0", "emoji-twitter": "emoji-datasource-twitter@16.0.0",
        "openmoji": "openmoji@17.0.0"}
_DEB_TUXPAINT, _DEB_OPENCLIPART, _DEB_GEMOJIONE = "tuxpaint-stamps-default", "openclipart-png", "ruby-gemojione"
_GEMOJIONE_PNG = "usr/share/rubygems-integration/all/gems/gemojione-3.3.0/assets/png/"
_TUXPAINT_STAMPS = "usr/share/tuxpaint/stamps/"
_OPENCLIPART_PNG = "usr/share/openclipart/png/"
_TOOL_FIXES = {
    "npm": "Install Node.js with npm (Debian/Ubuntu: `apt-get install npm`).",
    "apt-get": "The demo data uses Debian packages: build it on a Debian/Ubuntu machine (or copy a built cache folder).",
    "dpkg-deb": "Install dpkg (Debian/Ubuntu: `apt-get install dpkg`).",
}
_SCHEMA = {"path": pl.String, "label": pl.String, "caption": pl.String, "category": pl.String, "source": pl.String}
_CAPTION_SCHEMA = {"path": pl.String, "caption": pl.String, "source": pl.String}


@dataclass(frozen=True)
class DemoData:
    """Where a built demo dataset lives; manifest paths are relative to their root (POSIX)."""

    image_root: Path  # folder holding the labelled images
    image_manifest: Path  # manifest.parquet of labelled images: path, label, caption, category, source
    caption_root: Path  # folder holding the image-caption pairs' images
    caption_manifest: Path  # captions.parquet of image-caption pairs: path, caption, source


def ensure_demo_data(cache_dir: Path, *, max_emoji_classes: int = 600, max_caption_images: int = 2500,
                     max_caption_emoji: int = 1000, seed: int = 0, progress: Callable[[str], None] = print) -> DemoData:
    """Return the demo dataset under ``cache_dir``, downloading and building it on first use.

    ``max_emoji_classes`` emoji (drawn by at least two vendors), ``max_caption_images``
    openclipart pairs (about 2,040 survive the near-duplicate filter) and ``max_caption_emoji``
    pairs of other emoji are sampled with ``seed``; every label keeps at least two images.
    Raises ``RuntimeError`` naming the tool or package when a tool is missing or a
    download/unpack fails; a failed build leaves nothing behind.
    """
    if max_emoji_classes < 1 or max_caption_images < 0 or max_caption_emoji < 0:
        raise ValueError(f"max_emoji_classes={max_emoji_classes} must be >= 1, max_caption_images={max_caption_images} "
                         f"and max_caption_emoji={max_caption_emoji} >= 0")
    final = Path(cache_dir) / (f"demo-v{_LAYOUT_VERSION}-e{max_emoji_classes}-c{max_caption_images}"
                               f"-ce{max_caption_emoji}-s{seed}")
    data = _layout(final)
    if (final / _MARKER).is_file():
        return data
    tools = {name: _require_tool(name) for name in _TOOL_FIXES}
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=final.parent))
    try:
        started = time.monotonic()
        stats = _build(tmp, tools, (max_emoji_classes, max_caption_images, max_caption_emoji), seed, progress)
        stats.update(seconds=round(time.monotonic() - started, 1), max_emoji_classes=max_emoji_classes,
                     max_caption_images=max_caption_images, max_caption_emoji=max_caption_emoji, seed=seed)
        (tmp / _MARKER).write_text(json.dumps(stats, indent=2))  # written last: the folder is complete
        _move_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"demo data ready in {final} ({stats['seconds']} s)")
    return data


def _layout(root: Path) -> DemoData:
    """The file layout of a built dataset folder."""
    return DemoData(image_root=root / "images", image_manifest=root / "images" / "manifest.parquet",
                    caption_root=root / "captions", caption_manifest=root / "captions" / "captions.parquet")


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished build to ``final``; an incomplete leftover is replaced, a complete one kept."""
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / _MARKER).is_file():  # another process finished first: keep its copy
            return
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)


def _require_tool(name: str) -> str:
    """Absolute path of a command-line tool, or ``RuntimeError`` saying how to get it."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"Building the demo data needs `{name}`, which is not on PATH. {_TOOL_FIXES[name]}")
    return path


def _run(cmd: list[str], *, what: str, timeout: float, cwd: Path | None = None, hint: str = "") -> str:
    """Run a command, returning stdout; ``RuntimeError`` naming ``what`` on failure or timeout."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what}: `{shlex.join(cmd)}` timed out after {timeout:.0f} s") from exc
    except OSError as exc:
        raise RuntimeError(f"{what}: could not run `{shlex.join(cmd)}`: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-800:]
        raise RuntimeError(f"{what}: `{shlex.join(cmd)}` failed with exit code {done.returncode}: {tail}{hint}")
    return done.stdout


def _fetch(tools: dict[str, str], kind: str, spec: str, dest: Path, progress: Callable[[str], None]) -> Path:
    """Download one npm tarball (``kind='npm'``) or Debian package (``kind='deb'``) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    progress(f"fetching {spec} ({'npm' if kind == 'npm' else 'Debian'})")
    started = time.monotonic()
    if kind == "npm":
        _run([tools["npm"], "pack", spec, "--pack-destination", str(dest), "--silent"], cwd=dest,
             what=f"fetching npm package {spec}", timeout=_DOWNLOAD_TIMEOUT_S)
        pattern = spec.replace("@", "-", 1).lstrip("-") + ".tgz"
    else:
        _run([tools["apt-get"], "download", spec], cwd=dest, what=f"fetching Debian package {spec}",
             timeout=_DOWNLOAD_TIMEOUT_S, hint=" (if apt cannot locate it, run `apt-get update` first)")
        pattern = f"{spec}_*.deb"
    found = sorted(dest.glob(pattern))
    if not found:
        raise RuntimeError(f"fetching {spec}: the download finished but no {pattern} appeared in {dest}")
    progress(f"fetched {found[0].name}: {found[0].stat().st_size / 1e6:.1f} MB in {time.monotonic() - started:.1f} s")
    return found[0]


def _extract_tgz(archive: Path, dest: Path, keep: Callable[[str], bool]) -> int:
    """Unpack the regular files of a .tgz whose names ``keep`` accepts; number unpacked."""
    count = 0
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.isfile() and keep(member.name):
                    tar.extract(member, dest, filter="data")
                    count += 1
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise RuntimeError(f"unpacking {archive.name} failed: {exc}") from exc
    return count


def _extract_deb(dpkg_deb: str, deb: Path, dest: Path, keep: Callable[[str], bool]) -> int:
    """Stream a .deb's files through ``dpkg-deb --fsys-tarfile``, unpacking those ``keep`` accepts."""
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen([dpkg_deb, "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=errors)
        timer = threading.Timer(_EXTRACT_TIMEOUT_S, proc.kill)
        timer.start()
        count, failure = 0, None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and keep(member.name.removeprefix("./")):
                        tar.extract(member, dest, filter="data")
                        count += 1
            while proc.stdout.read(1 << 20):  # drain the end-of-archive padding so dpkg-deb exits cleanly
                pass
        except (tarfile.TarError, OSError, EOFError) as exc:
            failure = exc
        finally:
            timer.cancel()
            proc.stdout.close()
            code = proc.wait()
        if failure is not None or code != 0:
            errors.seek(0)
            detail = errors.read().decode(errors="replace").strip()[-800:] or failure or "killed (timeout?)"
            raise RuntimeError(f"unpacking Debian package {deb.name} with dpkg-deb failed (exit {code}): {detail}")
    return count


def _emoji_sources(tools: dict[str, str], downloads: Path, scratch: Path,
                   progress: Callable[[str], None]) -> tuple[list[src.Emoji], dict[str, dict[str, Path]]]:
    """Fetch and unpack the emoji packages: parsed emoji and, per source, key -> image file."""
    for source, spec in _NPM.items():
        archive = _fetch(tools, "npm", spec, downloads, progress)
        wanted = ("package/emoji.json", "package/img/google/64/", "package/img/twitter/64/",
                  "package/data/openmoji.csv", "package/color/svg/")
        progress(f"extracting {archive.name}")
        _extract_tgz(archive, scratch / source, lambda name: name.startswith(wanted))
        archive.unlink()
    vendor_files = {
        "emoji-google": src.index_files(scratch / "emoji-google/package/img/google/64", ".png"),
        "emoji-twitter": src.index_files(scratch / "emoji-twitter/package/img/twitter/64", ".png"),
        "openmoji": src.index_files(scratch / "openmoji/package/color/svg", ".svg"),
    }
    try:  # optional fourth style (EmojiOne 2.x)
        deb = _fetch(tools, "deb", _DEB_GEMOJIONE, downloads, progress)
        _extract_deb(tools["dpkg-deb"], deb, scratch / "emojione", lambda name: name.startswith(_GEMOJIONE_PNG))
        deb.unlink()
        vendor_files["emojione"] = src.index_files(scratch / "emojione" / _GEMOJIONE_PNG, ".png")
    except RuntimeError as exc:
        progress(f"warning: skipping the optional EmojiOne style: {exc}")
    rows = json.loads((scratch / "emoji-google/package/emoji.json").read_text(encoding="utf-8"))
    names = src.read_cldr_names(scratch / "openmoji/package/data/openmoji.csv")
    return src.parse_emoji_rows(rows, names), vendor_files


def _build(tmp: Path, tools: dict[str, str], limits: tuple[int, int, int], seed: int,
           progress: Callable[[str], None]) -> dict:
    """Build the whole dataset inside ``tmp``; ``limits``: (emoji classes, openclipart pairs, emoji caption pairs).
    Returns statistics for the marker file."""
    max_emoji_classes, max_caption_images, max_caption_emoji = limits
    data, downloads, scratch = _layout(tmp), tmp / "_downloads", tmp / "_scratch"
    emoji, vendor_files = _emoji_sources(tools, downloads, scratch, progress)
    chosen = src.select_emoji(emoji, vendor_files, max_emoji_classes, seed)
    rows = src.write_emoji(chosen, vendor_files, data.image_root)
    spare = src.select_spare_emoji(emoji, vendor_files, chosen, max_caption_emoji, seed)
    emoji_pairs = src.write_caption_emoji(spare, vendor_files, data.caption_root)
    shutil.rmtree(scratch, ignore_errors=True)  # unpacked packages go as soon as they are used
    progress(f"emoji: {len(rows)} images written ({len(chosen)} of {len(emoji)} emoji, {len(vendor_files)} styles); "
             f"{len(emoji_pairs)} image-caption pairs of other emoji")

    deb = _fetch(tools, "deb", _DEB_TUXPAINT, downloads, progress)
    progress(f"extracting {deb.name}")
    _extract_deb(tools["dpkg-deb"], deb, scratch / "tuxpaint",
                 lambda name: name.startswith(_TUXPAINT_STAMPS) and name.endswith((".png", ".svg", ".txt")))
    deb.unlink()
    tux_rows, tux_failed = src.write_tuxpaint(scratch / "tuxpaint" / _TUXPAINT_STAMPS, data.image_root)
    shutil.rmtree(scratch, ignore_errors=True)
    progress(f"Tux Paint: {len(tux_rows)} images written, {tux_failed} stamps skipped (unrenderable SVG)")

    digests = [hashlib.sha256((data.image_root / row["path"]).read_bytes()).hexdigest() for row in rows + tux_rows]
    kept, dropped = src.drop_duplicates_and_singletons(rows + tux_rows, digests)
    for row in dropped:
        (data.image_root / row["path"]).unlink(missing_ok=True)
    progress(f"dropped {len(dropped)} duplicate or singleton-label images; {len(kept)} labelled images kept")

    deb = _fetch(tools, "deb", _DEB_OPENCLIPART, downloads, progress)
    progress(f"extracting {deb.name}")
    _extract_deb(tools["dpkg-deb"], deb, scratch / "openclipart", lambda name: name.startswith(_OPENCLIPART_PNG))
    deb.unlink()
    pairs = src.write_openclipart(scratch / "openclipart" / _OPENCLIPART_PNG, data.caption_root, max_caption_images, seed)
    progress(f"openclipart: {len(pairs)} image-caption pairs written")
    pairs += emoji_pairs
    shutil.rmtree(downloads, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)

    _write_parquet(pl.DataFrame(kept, schema=_SCHEMA), data.image_manifest)
    _write_parquet(pl.DataFrame(pairs, schema=_CAPTION_SCHEMA), data.caption_manifest)
    return {"images_per_source": src.count_by(kept, "source"), "labels": len({row["label"] for row in kept}),
            "categories": len({row["category"] for row in kept}), "caption_pairs": len(pairs),
            "tuxpaint_skipped": tux_failed, "dropped": len(dropped)}


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    """Write ``frame`` to ``path`` atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    frame.write_parquet(partial)
    os.replace(partial, path)
