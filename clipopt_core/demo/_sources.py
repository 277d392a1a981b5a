"""Private helpers for :mod:`clipopt_core.demo.build`: read, select and store the shipped sources.

Nothing here downloads or starts a process; everything works on already-unpacked package
folders, so the parsing and selection rules can be unit-tested on small inline inputs.
"""
from __future__ import annotations

import csv
import html
import io
import random
import re
import shutil
import struct
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from PIL import Image

MAX_SIDE = 512  # larger images are downscaled (PNG, transparency kept); smaller are copied byte for byte
MIN_SVG_SIDE = 128  # SVGs drawn smaller than this are rendered at this size
MAX_PIXELS = 40_000_000  # skip absurd canvases (openclipart has a 231-megapixel PNG)
OPENMOJI_SIDE = 72

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SKIP_EMOJI_CATEGORIES = frozenset({"Component"})  # skin-tone swatches, hair components
_SKIP_EMOJI_SUBCATEGORIES = frozenset({"country-flag", "subdivision-flag"})  # near-identical across vendors
_TUX_STYLE_DIRS = frozenset({"cartoon", "toys", "plastic", "filled", "outlined", "lowercase", "uppercase", "coins",
                             "00_symbols"})  # style/format folders, merged into their parent class
_TUX_CATEGORIES = {"naturalforces": "natural forces"}
_TUX_LABELS = {  # reduced directory (style folders removed) -> class name, where the generic rule reads badly
    "animals/mammals/aquatic": "sea mammal", "clothes": "clothing", "hobbies/music/brass": "musical instrument",
    "hobbies/music/percussion": "musical instrument", "hobbies/music/string": "musical instrument",
    "hobbies/music/wind": "musical instrument", "household": "household item", "household/arttools": "art tool",
    "household/electronics": "electronic device", "medical": "medical item", "military/vehicles": "military vehicle",
    "naturalforces": "natural force", "people": "person", "seasonal": "seasonal item", "seasonal/newyears": "new year",
    "space": "spacecraft", "sports": "sports equipment", "symbols/alphabets/asl": "sign language letter",
    "symbols/alphabets/english": "letter", "symbols/alphabets/german": "german letter",
    "symbols/alphabets/spanish": "spanish letter", "symbols/chess": "chess piece", "symbols/math": "math symbol",
    "symbols/math/operators": "math operator", "symbols/money": "currency symbol",
    "symbols/money/canadian": "canadian coin", "symbols/money/euro": "euro coin", "symbols/money/japanese": "japanese coin",
    "symbols/money/us": "us coin", "symbols/music": "music symbol", "town": "town landmark", "town/roadsigns": "road sign",
    "vehicles/auto": "car", "vehicles/construction": "construction vehicle", "vehicles/emergency": "emergency vehicle",
    "vehicles/farming": "farm vehicle", "vehicles/flight": "aircraft", "vehicles/flight/planes": "airplane",
    "vehicles/masstransit": "bus", "vehicles/race": "race car",
}
_NOT_PLURAL = frozenset({"christmas", "us", "asl", "binoculars", "clothes", "glasses", "bus", "gas"})
_JUNK_TITLE = re.compile(
    r"clipart by|collection|theme|icon ?set|submission|sibmission|svg|http|architetto|untitled|\u00c3", re.IGNORECASE)
_ITALIAN_TITLED = "archite"  # file names of Architetto Francesco Rollandin's drawings, titled in Italian
_SVG_UNITS_PX = {"": 1.0, "px": 1.0, "pt": 4 / 3, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0}


@dataclass(frozen=True)
class Emoji:
    """One emoji concept: its vendor-independent key, class name and subcategory."""

    key: str
    label: str
    subcategory: str
    sort_order: int


# ---------------------------------------------------------------- emoji
def _emoji_key(code: str) -> str:
    """Vendor-independent key of a code-point sequence: upper case, ``-`` joined, FE0F dropped."""
    parts = [part.upper() for part in re.split(r"[-_\s]+", code.strip()) if part]
    return "-".join(part for part in parts if part != "FE0F")


def read_cldr_names(openmoji_csv: Path) -> dict[str, str]:
    """CLDR short names (``annotation`` column of OpenMoji's ``openmoji.csv``) by emoji key."""
    names: dict[str, str] = {}
    with open(openmoji_csv, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("annotation") and not row.get("skintone"):
                names.setdefault(_emoji_key(row["hexcode"]), row["annotation"])
    return names


def parse_emoji_rows(rows: Iterable[Mapping], cldr_names: Mapping[str, str]) -> list[Emoji]:
    """Turn ``emoji.json`` rows into :class:`Emoji`, skipping components and country flags.

    The label is the CLDR name when known, else the Unicode name, lower-cased; a label
    already taken by an earlier emoji (by ``sort_order``) is skipped so classes stay distinct.
    """
    out: list[Emoji] = []
    seen: set[str] = set()
    for row in sorted(rows, key=lambda r: int(r.get("sort_order") or 0)):
        if row.get("category") in _SKIP_EMOJI_CATEGORIES or row.get("subcategory") in _SKIP_EMOJI_SUBCATEGORIES:
            continue
        key = _emoji_key(str(row["unified"]))
        label = " ".join(str(cldr_names.get(key) or row.get("name") or "").lower().split())
        if label and label not in seen:
            seen.add(label)
            out.append(Emoji(key, label, str(row.get("subcategory") or "other"), int(row.get("sort_order") or 0)))
    return out


def index_files(folder: Path, suffix: str) -> dict[str, Path]:
    """Map emoji key -> file for every ``<code points>.<suffix>`` in ``folder`` (empty if absent)."""
    if not folder.is_dir():
        return {}
    return {_emoji_key(path.stem): path for path in sorted(folder.glob(f"*{suffix}"))}


def select_emoji(emoji: Sequence[Emoji], vendor_files: Mapping[str, Mapping[str, Path]], max_classes: int,
                  seed: int, min_vendors: int = 2) -> list[Emoji]:
    """Seeded sample of ``max_classes`` emoji among those drawn by at least ``min_vendors`` vendors."""
    eligible = [e for e in emoji if sum(e.key in files for files in vendor_files.values()) >= min_vendors]
    chosen = random.Random(seed).sample(eligible, min(max_classes, len(eligible)))
    return sorted(chosen, key=lambda e: e.sort_order)


def select_spare_emoji(emoji: Sequence[Emoji], vendor_files: Mapping[str, Mapping[str, Path]], chosen: Sequence[Emoji],
                        max_n: int, seed: int) -> list[tuple[Emoji, str]]:
    """Up to ``max_n`` ``(emoji, vendor)`` caption pairs from emoji *not* in the labelled set, one seeded vendor each.

    Their names are captions of concepts no labelled split holds, so they can join the held-out
    text→image benchmark without touching the class split.
    """
    taken = {e.key for e in chosen} | {e.label.lower() for e in chosen}
    spare = [e for e in emoji if e.key not in taken and e.label.lower() not in taken
             and any(e.key in files for files in vendor_files.values())]
    rng = random.Random(f"{seed}:spare-emoji")
    picked = sorted(rng.sample(spare, min(max_n, len(spare))), key=lambda e: e.sort_order)
    return [(e, rng.choice(sorted(v for v, files in vendor_files.items() if e.key in files))) for e in picked]


# ---------------------------------------------------------------- Tux Paint
def _singular(word: str) -> str:
    """English singular of a directory word (``dogs`` -> ``dog``, ``dishes`` -> ``dish``)."""
    if word in _NOT_PLURAL or len(word) < 4:
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _tux_label(rel_dir: str) -> tuple[str, str]:
    """``(label, category)`` of a Tux Paint stamp folder, e.g. ``animals/mammals/dogs`` -> ``("dog", "animals")``.

    Style folders (``cartoon``, ``filled``, ``lowercase`` ...) are merged into their parent.
    """
    parts = [part for part in rel_dir.strip("/").split("/") if part and part not in _TUX_STYLE_DIRS]
    if not parts:
        return "stamp", "stamps"
    category = _TUX_CATEGORIES.get(parts[0], parts[0].replace("_", " "))
    reduced = "/".join(parts)
    if reduced in _TUX_LABELS:
        return _TUX_LABELS[reduced], category
    words = parts[-1].replace("_", " ").replace("-", " ").lower().split()
    return " ".join([*words[:-1], _singular(words[-1])]), category


def _tux_stamps(stamps_root: Path) -> list[tuple[str, Path, str | None]]:
    """``(relative dir, image file, English sentence)`` per stamp; PNG preferred over SVG, mirror variants skipped."""
    stamps: dict[tuple[str, str], Path] = {}
    for path in sorted(stamps_root.rglob("*")):
        if path.suffix.lower() not in (".png", ".svg") or path.stem.endswith("_mirror") or not path.is_file():
            continue
        key = (path.parent.relative_to(stamps_root).as_posix(), path.stem)
        if key not in stamps or path.suffix.lower() == ".png":
            stamps[key] = path
    out = []
    for (rel_dir, _stem), path in sorted(stamps.items()):
        text = path.with_suffix(".txt")
        lines = text.read_text(encoding="utf-8", errors="replace").splitlines() if text.is_file() else []
        out.append((rel_dir, path, next((line.strip() for line in lines if line.strip()), None)))
    return out


# ---------------------------------------------------------------- openclipart titles
def _clean_title(raw: str | None) -> str | None:
    """A usable caption from an openclipart title, or ``None`` for empty, collection-like or garbled titles.

    Serial numbers go, ``_``, word-joining hyphens and camelCase become spaces.
    """
    text = re.sub(r"#\d+", " ", html.unescape(raw or ""))
    text = re.sub(r"(?<=[a-z]{2})(?=[A-Z][a-z])|_+|(?<=[A-Za-z]{2})-(?=[A-Za-z]{2})", " ", text)
    text = " ".join(text.split()).strip(" .-")
    if sum(ch.isalpha() for ch in text) < 3 or _JUNK_TITLE.search(text):
        return None
    return text


def _title_family(title: str) -> str:
    """Near-duplicate family of a title: its first two words, ignoring digits and parentheses."""
    return " ".join(re.findall(r"[a-z]+", re.sub(r"\(.*?\)", " ", title.lower()))[:2])


def _select_caption_pairs(items: Sequence[tuple[str, str | None]], max_n: int, seed: int, *, max_repeats: int = 3,
                          max_per_family: int = 3, max_per_dir: int = 200) -> list[tuple[str, str]]:
    """Pick up to ``max_n`` ``(path, caption)`` pairs from ``(path, raw title)`` items, seeded.

    Titles shared by more than ``max_repeats`` images name a collection ("gramastar": 1375
    stars), so they are dropped; of a repeated title one image is kept; at most
    ``max_per_family`` titles per :func:`_title_family` ("hotel icon ...") and
    ``max_per_dir`` pairs per folder survive. Result sorted by path.
    """
    cleaned = [(path, _clean_title(title)) for path, title in sorted(items)]
    counts = Counter(title.lower() for _path, title in cleaned if title)
    candidates: dict[str, tuple[str, str]] = {}
    for path, title in cleaned:
        if title and counts[title.lower()] <= max_repeats:
            candidates.setdefault(title.lower(), (path, title))
    pool = sorted(candidates.values())
    random.Random(seed).shuffle(pool)
    families: Counter[str] = Counter()
    folders: Counter[str] = Counter()
    chosen = []
    for path, title in pool:
        family, folder = _title_family(title), path.rpartition("/")[0]
        if families[family] >= max_per_family or folders[folder] >= max_per_dir:
            continue
        families[family] += 1
        folders[folder] += 1
        chosen.append((path, title))
        if len(chosen) >= max_n:
            break
    return sorted(chosen)


# ---------------------------------------------------------------- images
def _read_png_info(path: Path) -> tuple[tuple[int, int], dict[str, str]]:
    """``((width, height), text chunks)`` of a PNG without decoding pixels (text after the image data is ignored)."""
    texts: dict[str, str] = {}
    size = (0, 0)
    with open(path, "rb") as handle:
        if handle.read(8) != _PNG_SIGNATURE:
            raise ValueError(f"{path} is not a PNG file")
        while len(header := handle.read(8)) == 8:
            length, kind = struct.unpack(">I4s", header)
            if kind in (b"IDAT", b"IEND"):
                break
            data = handle.read(length)
            handle.read(4)  # CRC
            if kind == b"IHDR":
                size = struct.unpack(">II", data[:8])
            elif kind == b"tEXt" and b"\0" in data:
                key, value = data.split(b"\0", 1)
                texts[key.decode("latin-1")] = value.decode("latin-1")
            elif kind == b"iTXt" and data.count(b"\0") >= 3:
                key, rest = data.split(b"\0", 1)
                compressed, rest = rest[0], rest[2:]
                _lang, _translated, value = rest.split(b"\0", 2)
                texts[key.decode("latin-1")] = (zlib.decompress(value) if compressed else value).decode("utf-8", "replace")
    return size, texts


def _store_png(src: Path, dst: Path, max_side: int = MAX_SIDE) -> bool:
    """Copy a PNG (or downscale one larger than ``max_side``, keeping transparency); ``False`` if unusable."""
    try:
        (width, height), _texts = _read_png_info(src)
        if not 0 < width * height <= MAX_PIXELS:
            return False
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as image:
            if max(width, height) <= max_side:
                image.verify()
                shutil.copyfile(src, dst)
                return True
            if image.mode not in ("RGB", "RGBA", "L", "LA"):
                image = image.convert("RGBA")
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            image.save(dst, format="PNG", compress_level=3)
        return True
    except (OSError, ValueError, SyntaxError, struct.error, zlib.error):
        dst.unlink(missing_ok=True)
        return False


def _svg_with_px_size(text: str) -> str | None:
    """The SVG with its root ``width``/``height`` converted to px and a matching ``viewBox`` added.

    Rescues files that resvg rejects with "invalid size" (e.g. ``width="128pt"`` and no
    viewBox); ``None`` when the root element has no usable absolute size.
    """
    match = re.search(r"<svg\b[^>]*>", text)
    if not match:
        return None
    tag, sizes = match.group(0), {}
    for attr in ("width", "height"):
        found = re.search(rf'\b{attr}\s*=\s*["\']\s*([\d.]+)\s*(pt|pc|px|mm|cm|in|)\s*["\']', tag)
        if not found:
            return None
        sizes[attr] = float(found.group(1)) * _SVG_UNITS_PX[found.group(2)]
        tag = tag[:found.start()] + f'{attr}="{sizes[attr]:.3f}"' + tag[found.end():]
    if "viewbox" not in tag.lower():
        closing = "/>" if tag.endswith("/>") else ">"
        tag = tag[:-len(closing)] + f' viewBox="0 0 {sizes["width"]:.3f} {sizes["height"]:.3f}"' + closing
    return text[:match.start()] + tag + text[match.end():]


def _render_svg(src: Path, dst: Path, side: int | None = None) -> bool:
    """Render an SVG to a transparent PNG with resvg: ``side`` x ``side`` if given, else its own size
    clamped to [MIN_SVG_SIDE, MAX_SIDE]. ``False`` when it cannot be rendered or renders blank."""
    import resvg_py

    text = src.read_text(encoding="utf-8", errors="replace")
    for attempt in (text, _svg_with_px_size(text)):
        if attempt is None:
            continue
        try:
            options = {"width": side, "height": side} if side else {}
            image = Image.open(io.BytesIO(resvg_py.svg_to_bytes(svg_string=attempt, **options)))
            longest = max(image.size)
            if not side and not MIN_SVG_SIDE <= longest <= MAX_SIDE:
                zoom = min(max(longest, MIN_SVG_SIDE), MAX_SIDE) / longest
                image = Image.open(io.BytesIO(resvg_py.svg_to_bytes(svg_string=attempt, zoom=zoom)))
            image.load()
        except Exception:  # resvg raises ValueError for most problems, but be robust to any parser error
            continue
        if image.getbbox() is None:
            return False
        dst.parent.mkdir(parents=True, exist_ok=True)
        image.save(dst, format="PNG", compress_level=3)
        return True
    return False


def write_emoji(chosen: Sequence[Emoji], vendor_files: Mapping[str, Mapping[str, Path]], image_root: Path) -> list[dict]:
    """Store every vendor's drawing of the chosen emoji as ``emoji/<source>/<key>.png``; manifest rows."""
    rows = []
    for emoji in chosen:
        for source, files in vendor_files.items():
            src, rel = files.get(emoji.key), f"emoji/{source}/{emoji.key.lower()}.png"
            if src is not None and _store_emoji(src, image_root / rel):
                rows.append({"path": rel, "label": emoji.label, "caption": emoji.label,
                             "category": emoji.subcategory, "source": source})
    return rows


def write_caption_emoji(pairs: Sequence[tuple[Emoji, str]], vendor_files: Mapping[str, Mapping[str, Path]],
                         caption_root: Path) -> list[dict]:
    """Store the drawings of :func:`select_spare_emoji` as ``emoji/<source>/<key>.png``; caption-manifest rows."""
    rows = []
    for emoji, source in pairs:
        rel = f"emoji/{source}/{emoji.key.lower()}.png"
        if _store_emoji(vendor_files[source][emoji.key], caption_root / rel):
            rows.append({"path": rel, "caption": emoji.label, "source": "emoji"})
    return rows


def _store_emoji(src: Path, dst: Path) -> bool:
    return _render_svg(src, dst, OPENMOJI_SIDE) if src.suffix == ".svg" else _store_png(src, dst)


def write_tuxpaint(stamps_root: Path, image_root: Path) -> tuple[list[dict], int]:
    """Store the Tux Paint stamps as ``tuxpaint/<dir>/<stem>.png``; ``(rows, stamps that could not be stored)``."""
    rows, failed = [], 0
    for rel_dir, src, sentence in _tux_stamps(stamps_root):
        rel = "/".join(part for part in ("tuxpaint", rel_dir, f"{src.stem}.png") if part)
        stored = _render_svg(src, image_root / rel) if src.suffix.lower() == ".svg" else _store_png(src, image_root / rel)
        if not stored:
            failed += 1
            continue
        label, category = _tux_label(rel_dir)
        rows.append({"path": rel, "label": label, "caption": sentence, "category": category, "source": "tuxpaint"})
    return rows, failed


def write_openclipart(png_root: Path, caption_root: Path, max_n: int, seed: int) -> list[dict]:
    """Store up to ``max_n`` titled openclipart PNGs (see :func:`_select_caption_pairs`) as ``openclipart/...``."""
    items = []
    for path in sorted(png_root.rglob("*.png")):
        if path.is_symlink() or not path.is_file() or _ITALIAN_TITLED in path.name:
            continue
        try:
            (width, height), texts = _read_png_info(path)
        except (OSError, ValueError, struct.error, zlib.error):
            continue
        if 0 < width * height <= MAX_PIXELS:
            items.append((path.relative_to(png_root).as_posix(), texts.get("Title")))
    rows = []
    for rel, caption in _select_caption_pairs(items, max_n, seed):
        if "flags" in rel.split("/")[:-1] and "flag" not in caption.lower():
            caption = f"flag of {caption}"  # flag files are titled by the country only
        if _store_png(png_root / rel, caption_root / "openclipart" / rel):
            rows.append({"path": f"openclipart/{rel}", "caption": caption, "source": "openclipart"})
    return rows


def drop_duplicates_and_singletons(rows: Sequence[dict], digests: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """``(kept, dropped)``: rows whose bytes repeat an earlier row's are dropped, then labels with < 2 rows."""
    seen: set[str] = set()
    unique, dropped = [], []
    for row, digest in zip(rows, digests, strict=True):
        (dropped if digest in seen else unique).append(row)
        seen.add(digest)
    sizes = Counter(row["label"] for row in unique)
    kept = [row for row in unique if sizes[row["label"]] >= 2]
    dropped += [row for row in unique if sizes[row["label"]] < 2]
    return kept, dropped


def count_by(rows: Iterable[Mapping], key: str) -> dict[str, int]:
    """Rows per value of ``key``, sorted by value."""
    counts: defaultdict[str, int] = defaultdict(int)
    for row in rows:
        counts[str(row[key])] += 1
    return dict(sorted(counts.items()))
