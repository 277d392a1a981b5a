"""Tests for clipopt_core.demo.build: pure helpers on hand-written inputs, plus one slow real build."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import polars as pl
import pytest
from PIL import Image, PngImagePlugin

from clipopt_core.demo import _sources as src
from clipopt_core.demo import build as demo_data
from clipopt_core.demo.build import DemoData, ensure_demo_data


# ---------------------------------------------------------------- emoji
@pytest.mark.parametrize("code, key", [
    ("1F600", "1F600"), ("0023-fe0f-20e3", "0023-20E3"), ("1f93c-200d-2642-FE0F", "1F93C-200D-2642"), (" 2764 ", "2764"),
])
def test_emoji_key_normalises_case_and_variation_selector(code: str, key: str) -> None:
    assert src._emoji_key(code) == key


def test_read_cldr_names_skips_skin_tone_rows(tmp_path: Path) -> None:
    csv_path = tmp_path / "openmoji.csv"
    csv_path.write_text("emoji,hexcode,annotation,skintone\n"
                        "x,1F600,grinning face,\n"
                        "x,1F44B-1F3FB,waving hand: light skin tone,1\n"
                        "x,2764-FE0F,red heart,\n", encoding="utf-8")
    assert src.read_cldr_names(csv_path) == {"1F600": "grinning face", "2764": "red heart"}


def test_parse_emoji_rows_filters_and_names() -> None:
    rows = [
        {"name": "SMILING FACE WITH OPEN MOUTH", "unified": "1F603", "category": "Smileys & Emotion",
         "subcategory": "face-smiling", "sort_order": 2},
        {"name": "GRINNING FACE", "unified": "1F600", "category": "Smileys & Emotion",
         "subcategory": "face-smiling", "sort_order": 1},
        {"name": "EMOJI MODIFIER FITZPATRICK TYPE-3", "unified": "1F3FC", "category": "Component",
         "subcategory": "skin-tone", "sort_order": 3},
        {"name": "ANDORRA FLAG", "unified": "1F1E6-1F1E9", "category": "Flags", "subcategory": "country-flag",
         "sort_order": 4},
        {"name": "CHEQUERED FLAG", "unified": "1F3C1", "category": "Flags", "subcategory": "flag", "sort_order": 5},
        {"name": "GRINNING   FACE", "unified": "1F601", "category": "Smileys & Emotion",
         "subcategory": "face-smiling", "sort_order": 6},  # same label as 1F600: skipped
        {"name": "HEAVY BLACK HEART", "unified": "2764-FE0F", "category": "Smileys & Emotion",
         "subcategory": "heart", "sort_order": 7},
    ]
    cldr = {"1F603": "grinning face with big eyes", "2764": "Red Heart"}
    assert src.parse_emoji_rows(rows, cldr) == [
        src.Emoji("1F600", "grinning face", "face-smiling", 1),
        src.Emoji("1F603", "grinning face with big eyes", "face-smiling", 2),
        src.Emoji("1F3C1", "chequered flag", "flag", 5),
        src.Emoji("2764", "red heart", "heart", 7),
    ]


def test_select_emoji_needs_two_vendors_and_is_seeded() -> None:
    emoji = [src.Emoji(f"K{i}", f"e{i}", "sub", i) for i in range(10)]
    vendors = {"a": {f"K{i}": Path(f"a{i}") for i in range(10)}, "b": {f"K{i}": Path(f"b{i}") for i in range(0, 10, 2)}}
    chosen = src.select_emoji(emoji, vendors, max_classes=3, seed=7)
    assert len(chosen) == 3 and all(int(e.key[1:]) % 2 == 0 for e in chosen)
    assert chosen == sorted(chosen, key=lambda e: e.sort_order)
    assert chosen == src.select_emoji(emoji, vendors, max_classes=3, seed=7)
    assert [e.key for e in src.select_emoji(emoji, vendors, max_classes=99, seed=0)] == ["K0", "K2", "K4", "K6", "K8"]


def test_spare_emoji_become_caption_pairs_outside_the_labelled_set(tmp_path: Path) -> None:
    emoji = [src.Emoji(f"K{i}", f"e{i}", "sub", i) for i in range(10)] + [src.Emoji("K10", "E0", "sub", 10)]
    vendors = {"a": {f"K{i}": Path(f"a{i}") for i in range(1, 11)}, "b": {f"K{i}": Path(f"b{i}") for i in range(0, 11, 2)}}
    chosen = src.select_emoji(emoji, vendors, max_classes=3, seed=7)
    spare = src.select_spare_emoji(emoji, vendors, chosen, max_n=99, seed=7)
    names = {e.label.lower() for e in chosen}
    expected = {e.key for e in emoji if e not in chosen and e.label.lower() not in names}  # "E0" names e0 again
    assert {e.key for e, _ in spare} == expected and len(expected) >= 7
    assert all(e.key in vendors[vendor] for e, vendor in spare)
    assert spare == src.select_spare_emoji(emoji, vendors, chosen, max_n=99, seed=7)
    few = src.select_spare_emoji(emoji, vendors, chosen, max_n=2, seed=7)
    assert len(few) == 2 and few == sorted(few, key=lambda pair: pair[0].sort_order)
    png = _png(tmp_path / "k1.png", (8, 8))
    rows = src.write_caption_emoji([(src.Emoji("K1", "grinning face", "sub", 1), "a")], {"a": {"K1": png}}, tmp_path / "out")
    assert rows == [{"path": "emoji/a/k1.png", "caption": "grinning face", "source": "emoji"}]
    assert (tmp_path / "out" / "emoji" / "a" / "k1.png").is_file()


# ---------------------------------------------------------------- Tux Paint
@pytest.mark.parametrize("word, singular", [
    ("dogs", "dog"), ("dishes", "dish"), ("butterflies", "butterfly"), ("fish", "fish"), ("christmas", "christmas"),
    ("glass", "glass"), ("boxes", "box"), ("us", "us"),
])
def test_singular(word: str, singular: str) -> None:
    assert src._singular(word) == singular


@pytest.mark.parametrize("rel_dir, expected", [
    ("animals/mammals/dogs", ("dog", "animals")),
    ("animals/mammals/bears/cartoon", ("bear", "animals")),
    ("animals/mammals", ("mammal", "animals")),
    ("symbols/alphabets/english/filled/lowercase", ("letter", "symbols")),
    ("symbols/money/us/coins", ("us coin", "symbols")),
    ("household/dishes", ("dish", "household")),
    ("food/fruit/cartoon", ("fruit", "food")),
    ("naturalforces", ("natural force", "natural forces")),
    ("seasonal/christmas", ("christmas", "seasonal")),
    ("people/body_parts", ("body part", "people")),
    ("people/cartoon", ("person", "people")),
    ("town/roadsigns", ("road sign", "town")),
    ("", ("stamp", "stamps")),
])
def test_tux_label_is_readable(rel_dir: str, expected: tuple[str, str]) -> None:
    assert src._tux_label(rel_dir) == expected


def test_tux_stamps_prefers_png_skips_mirrors_reads_sentence(tmp_path: Path) -> None:
    folder = tmp_path / "animals" / "dogs"
    folder.mkdir(parents=True)
    for name in ("dog.png", "dog.svg", "dog_mirror.png", "cat.svg", "bare.png"):
        (folder / name).write_bytes(b"x")
    (folder / "dog.txt").write_text("A dog.\nde.utf8=Ein Hund.\n", encoding="utf-8")
    (folder / "cat.txt").write_text("\n  A cat.  \n", encoding="utf-8")
    assert src._tux_stamps(tmp_path) == [
        ("animals/dogs", folder / "bare.png", None),
        ("animals/dogs", folder / "cat.svg", "A cat."),
        ("animals/dogs", folder / "dog.png", "A dog."),
    ]


# ---------------------------------------------------------------- openclipart titles
@pytest.mark.parametrize("raw, clean", [
    ("Chemistry Flask", "Chemistry Flask"), ("  Jupiter. ", "Jupiter"), ("BlueMan#109", "Blue Man"),
    ("arrowRight", "arrow Right"), ("digital-camera", "digital camera"), ("T-shirt", "T-shirt"),
    ("tree_whit_fruits", "tree whit fruits"), ("Fish &amp; Chips", "Fish & Chips"),
    ("Clipart by Nicu Buculei - bee", None), ("SVG gradient collection by Alan Horkan", None),
    ("Lemon SVG theme", None), ("l&atilde;&copy;zard", None), ("ms", None), ("", None), (None, None), ("0001", None),
])
def test_clean_title(raw: str | None, clean: str | None) -> None:
    assert src._clean_title(raw) == clean


@pytest.mark.parametrize("title, family", [
    ("Hotel icon dishwasher", "hotel icon"), ("Hot Dog (B and W)", "hot dog"), ("led rounded h (grey)", "led rounded"),
    ("Tigre01", "tigre"), ("Jupiter", "jupiter"),
])
def test_title_family(title: str, family: str) -> None:
    assert src._title_family(title) == family


def test_select_caption_pairs_filters_near_duplicates() -> None:
    items = [(f"shapes/stars/star{i}.png", "gramastar") for i in range(5)]  # a collection name: all dropped
    items += [("animals/dolphin_b.png", "Dolphin"), ("animals/dolphin_a.png", "dolphin")]  # repeated: first path kept
    items += [(f"hotel/{c}.png", f"Hotel icon {c}") for c in "abcde"]  # a family: at most 3 by default
    items += [("misc/x.png", None), ("misc/y.png", "Clipart by Nicu Buculei - y"), ("misc/z.png", "Zebra")]
    assert sum(path.startswith("hotel/") for path, _ in src._select_caption_pairs(items, 100, seed=0)) == 3
    chosen = src._select_caption_pairs(items, 100, seed=0, max_per_family=1)
    assert [path for path, _ in chosen if path.startswith(("animals", "misc"))] == ["animals/dolphin_a.png", "misc/z.png"]
    assert dict(chosen)["animals/dolphin_a.png"] == "dolphin"
    assert sum(path.startswith("hotel/") for path, _ in chosen) == 1
    assert len(chosen) == 3 and chosen == sorted(chosen)
    assert src._select_caption_pairs(items, 2, seed=0) == src._select_caption_pairs(items, 2, seed=0)
    assert len(src._select_caption_pairs(items, 2, seed=0)) == 2
    same_dir = [(f"d/{i}.png", f"word{chr(97 + i)} thing{i}") for i in range(6)]
    assert len(src._select_caption_pairs(same_dir, 100, seed=1, max_per_dir=4)) == 4


# ---------------------------------------------------------------- images
def _png(path: Path, size: tuple[int, int], mode: str = "RGBA", texts: dict[str, str] | None = None) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in (texts or {}).items():
        info.add_text(key, value, zip=key.startswith("z")) if value.isascii() else info.add_itxt(key, value)
    Image.new(mode, size, (255, 0, 0, 0) if mode == "RGBA" else 0).save(path, pnginfo=info)
    return path


def test_read_png_info_gets_size_and_titles_without_decoding(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png", (30, 20), texts={"Title": "Chemistry Flask", "Author": "Ünïcode"})
    assert src._read_png_info(path) == ((30, 20), {"Title": "Chemistry Flask", "Author": "Ünïcode"})
    (tmp_path / "b.png").write_bytes(b"GIF89a...")
    with pytest.raises(ValueError, match="not a PNG"):
        src._read_png_info(tmp_path / "b.png")


def test_store_png_copies_small_and_downscales_large(tmp_path: Path) -> None:
    small = _png(tmp_path / "small.png", (40, 30))
    assert src._store_png(small, tmp_path / "out" / "small.png")
    assert (tmp_path / "out" / "small.png").read_bytes() == small.read_bytes()
    large = _png(tmp_path / "large.png", (1200, 600))
    assert src._store_png(large, tmp_path / "out" / "large.png", max_side=512)
    with Image.open(tmp_path / "out" / "large.png") as image:
        assert image.size == (512, 256) and image.mode == "RGBA" and image.getpixel((0, 0))[3] == 0
    (tmp_path / "bad.png").write_bytes(small.read_bytes()[:40])
    assert not src._store_png(tmp_path / "bad.png", tmp_path / "out" / "bad.png")
    assert not (tmp_path / "out" / "bad.png").exists()


def test_svg_with_px_size_adds_viewbox() -> None:
    svg = '<?xml version="1.0"?><svg id="s" width="12pt" height="6pt" xmlns="http://www.w3.org/2000/svg"><g/></svg>'
    fixed = src._svg_with_px_size(svg)
    assert fixed == ('<?xml version="1.0"?><svg id="s" width="16.000" height="8.000" xmlns="http://www.w3.org/2000/svg"'
                     ' viewBox="0 0 16.000 8.000"><g/></svg>')
    assert src._svg_with_px_size('<svg width="100%" height="100%"></svg>') is None
    kept = src._svg_with_px_size('<svg width="10" height="5" viewBox="0 0 1 1"></svg>')
    assert kept == '<svg width="10.000" height="5.000" viewBox="0 0 1 1"></svg>'


def test_render_svg_rescues_pt_sizes_and_skips_blank(tmp_path: Path) -> None:
    shape = '<rect x="0" y="0" width="96" height="48" fill="red"/>'
    (tmp_path / "pt.svg").write_text(f'<svg width="72pt" height="36pt" xmlns="http://www.w3.org/2000/svg">{shape}</svg>')
    assert src._render_svg(tmp_path / "pt.svg", tmp_path / "pt.png")
    with Image.open(tmp_path / "pt.png") as image:  # 96x48 px, below the minimum: rendered at 128 px
        assert image.size == (128, 64) and image.mode == "RGBA"
    (tmp_path / "sq.svg").write_text(f'<svg viewBox="0 0 96 96" xmlns="http://www.w3.org/2000/svg">{shape}</svg>')
    assert src._render_svg(tmp_path / "sq.svg", tmp_path / "sq.png", side=72)
    assert Image.open(tmp_path / "sq.png").size == (72, 72)
    (tmp_path / "blank.svg").write_text('<svg width="50" height="50" xmlns="http://www.w3.org/2000/svg"></svg>')
    assert not src._render_svg(tmp_path / "blank.svg", tmp_path / "blank.png")
    (tmp_path / "junk.svg").write_text("not an svg")
    assert not src._render_svg(tmp_path / "junk.svg", tmp_path / "junk.png")


def test_drop_duplicates_and_singletons() -> None:
    rows = [{"label": "a", "i": 0}, {"label": "a", "i": 1}, {"label": "b", "i": 2}, {"label": "b", "i": 3},
            {"label": "c", "i": 4}, {"label": "a", "i": 5}]
    kept, dropped = src.drop_duplicates_and_singletons(rows, ["x", "y", "x", "z", "w", "v"])
    assert [row["i"] for row in kept] == [0, 1, 5]
    assert sorted(row["i"] for row in dropped) == [2, 3, 4]


# ---------------------------------------------------------------- orchestration without network
def test_require_tool_names_missing_tool_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_data.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"`npm`.*apt-get install npm"):
        demo_data._require_tool("npm")


def test_run_reports_failures_and_timeouts() -> None:
    assert demo_data._run([sys.executable, "-c", "print('ok')"], what="x", timeout=30) == "ok\n"
    with pytest.raises(RuntimeError, match=r"fetching npm package foo@1.*exit code 3.*boom"):
        demo_data._run([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"],
                       what="fetching npm package foo@1", timeout=30)
    with pytest.raises(RuntimeError, match="timed out after 1 s"):
        demo_data._run([sys.executable, "-c", "import time; time.sleep(5)"], what="slow", timeout=1)


def test_fetch_failure_names_the_package(tmp_path: Path) -> None:
    fake = tmp_path / "fake-tool"
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package' >&2\nexit 100\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"Debian package tuxpaint-stamps-default.*exit code 100.*apt-get update"):
        demo_data._fetch({"apt-get": str(fake)}, "deb", "tuxpaint-stamps-default", tmp_path / "dl", lambda m: None)
    with pytest.raises(RuntimeError, match=r"npm package openmoji@17.0.0"):
        demo_data._fetch({"npm": str(fake)}, "npm", "openmoji@17.0.0", tmp_path / "dl", lambda m: None)


def test_extract_tgz_keeps_only_wanted_files(tmp_path: Path) -> None:
    (tmp_path / "package" / "img").mkdir(parents=True)
    (tmp_path / "package" / "emoji.json").write_text("[]")
    (tmp_path / "package" / "img" / "a.png").write_bytes(b"a")
    (tmp_path / "package" / "README.md").write_text("x")
    with tarfile.open(tmp_path / "p.tgz", "w:gz") as tar:
        tar.add(tmp_path / "package", arcname="package")
    keep = ("package/emoji.json", "package/img/")
    assert demo_data._extract_tgz(tmp_path / "p.tgz", tmp_path / "out", lambda n: n.startswith(keep)) == 2
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.*")) == [
        "package/emoji.json", "package/img/a.png"]
    (tmp_path / "bad.tgz").write_bytes(b"not gzip")
    with pytest.raises(RuntimeError, match="bad.tgz"):
        demo_data._extract_tgz(tmp_path / "bad.tgz", tmp_path / "out2", lambda n: True)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_extract_deb_streams_selected_files(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text("Package: tiny\nVersion: 1.0\nArchitecture: all\n"
                                            "Maintainer: t <t@example.org>\nDescription: t\n")
    (pkg / "usr/share/tiny").mkdir(parents=True)
    (pkg / "usr/share/tiny/a.png").write_bytes(b"a")
    (pkg / "usr/share/tiny/b.ogg").write_bytes(b"b")
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(tmp_path / "tiny.deb")],
                   check=True, capture_output=True, timeout=60)
    dpkg = shutil.which("dpkg-deb")
    assert demo_data._extract_deb(dpkg, tmp_path / "tiny.deb", tmp_path / "out", lambda n: n.endswith(".png")) == 1
    assert (tmp_path / "out/usr/share/tiny/a.png").read_bytes() == b"a"
    assert not (tmp_path / "out/usr/share/tiny/b.ogg").exists()
    (tmp_path / "broken.deb").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="broken.deb"):
        demo_data._extract_deb(dpkg, tmp_path / "broken.deb", tmp_path / "out2", lambda n: True)


def test_ensure_returns_existing_build_without_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = demo_data._layout(tmp_path / f"demo-v{demo_data._LAYOUT_VERSION}-e5-c7-ce4-s3")
    layout.image_root.mkdir(parents=True)
    (layout.image_root.parent / demo_data._MARKER).write_text("{}")
    monkeypatch.setattr(demo_data.shutil, "which", lambda name: None)
    started = time.monotonic()
    data = ensure_demo_data(tmp_path, max_emoji_classes=5, max_caption_images=7, max_caption_emoji=4, seed=3,
                            progress=lambda m: None)
    assert time.monotonic() - started < 0.5
    assert data == layout and isinstance(data, DemoData)
    assert data.image_manifest.name == "manifest.parquet" and data.caption_manifest.name == "captions.parquet"


def test_ensure_raises_for_missing_tool_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_data.shutil, "which", lambda name: None if name == "npm" else f"/usr/bin/{name}")
    with pytest.raises(RuntimeError, match="`npm`"):
        ensure_demo_data(tmp_path / "cache", progress=lambda m: None)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with pytest.raises(ValueError):
        ensure_demo_data(tmp_path / "cache", max_emoji_classes=0)


def test_move_into_place_replaces_incomplete_and_keeps_complete(tmp_path: Path) -> None:
    final, tmp = tmp_path / "final", tmp_path / "tmp"
    (final / "junk").mkdir(parents=True)
    tmp.mkdir()
    (tmp / demo_data._MARKER).write_text("new")
    demo_data._move_into_place(tmp, final)
    assert (final / demo_data._MARKER).read_text() == "new" and not (final / "junk").exists()
    tmp.mkdir()
    (tmp / demo_data._MARKER).write_text("other")
    demo_data._move_into_place(tmp, final)  # a complete copy is already there: kept
    assert (final / demo_data._MARKER).read_text() == "new"


def test_write_parquet_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "m.parquet"
    demo_data._write_parquet(pl.DataFrame([], schema=demo_data._SCHEMA), target)
    assert pl.read_parquet(target).schema == pl.Schema(demo_data._SCHEMA)
    assert [p.name for p in target.parent.iterdir()] == ["m.parquet"]


# ---------------------------------------------------------------- the real build
@pytest.fixture(scope="session")
def real_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoData, Path, float]:
    missing = [tool for tool in ("npm", "apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the demo data needs {missing} on PATH")
    cache = tmp_path_factory.mktemp("demo-cache")
    started = time.monotonic()
    data = ensure_demo_data(cache, progress=lambda message: print(message, flush=True))
    return data, cache, time.monotonic() - started


@pytest.mark.slow
def test_real_demo_build(real_demo: tuple[DemoData, Path, float]) -> None:
    data, cache, _seconds = real_demo
    images = pl.read_parquet(data.image_manifest)
    assert images.schema == pl.Schema({c: pl.String for c in ("path", "label", "caption", "category", "source")})
    assert images["path"].n_unique() == images.height and images["label"].null_count() == 0
    assert images.group_by("label").len()["len"].min() >= 2
    sources = set(images["source"])
    assert {"emoji-google", "emoji-twitter", "openmoji", "tuxpaint"} <= sources and len(sources) >= 3
    emoji = images.filter(pl.col("source") != "tuxpaint")
    assert emoji["label"].n_unique() == 600 and emoji["caption"].null_count() == 0
    assert images.filter(pl.col("source") == "tuxpaint").height > 800
    captions = pl.read_parquet(data.caption_manifest)
    assert captions.columns == ["path", "caption", "source"] and captions.height >= 2900
    assert set(captions["source"]) == {"openclipart", "emoji"} and captions.filter(pl.col("source") == "emoji").height == 1000
    assert captions["caption"].str.len_chars().min() >= 2  # emoji names such as "ox"
    emoji_captions = set(captions.filter(pl.col("source") == "emoji")["caption"].str.to_lowercase())
    assert not emoji_captions & set(emoji["label"].str.to_lowercase())  # other emoji than the labelled ones
    for root, frame in ((data.image_root, images), (data.caption_root, captions)):
        for rel in frame["path"]:
            assert "\\" not in rel and not rel.startswith("/") and ".." not in rel.split("/")
            with Image.open(root / rel) as image:
                image.load()
                assert image.format == "PNG" and min(image.size) >= 1
    stats = json.loads((data.image_root.parent / demo_data._MARKER).read_text())
    assert stats["labels"] == images["label"].n_unique()
    assert not list(cache.glob(".demo-build-*"))
    started = time.monotonic()
    assert ensure_demo_data(cache, progress=lambda m: None) == data
    assert time.monotonic() - started < 0.5
