"""Caption corpus: several captions per image survive ingest; the held-out caption split and what trains on it."""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from clipopt_core.data.captions import (
    caption_pool,
    caption_test_pairs,
    normalise_caption,
    normalised_caption,
    realign_pairs,
    realign_validation_pairs,
    split_caption_pairs,
)
from clipopt_core.data.manifest import ingest, scan_source
from tests.conftest import COLOURS, draw_shape


def _five_caption_source(root: Path, images: int = 4) -> Path:
    """COCO-style: ``images`` images × 5 captions each, plus one exact repeat and one byte-copy of image 0."""
    root.mkdir(parents=True)
    rows = []
    for number in range(images):
        draw_shape("circle", list(COLOURS.values())[number % 4], seed=number).save(root / f"img{number}.png")
        rows += [{"path": f"img{number}.png", "caption": f"caption {c} of image {number}"} for c in range(5)]
    (root / "copy_of_0.png").write_bytes((root / "img0.png").read_bytes())
    rows.append({"path": "img1.png", "caption": "caption 0 of image 1"})  # a true duplicate pair
    rows.append({"path": "copy_of_0.png", "caption": "another caption of image 0"})  # same bytes, new caption
    pl.DataFrame(rows).write_csv(root / "manifest.csv")
    return root


def test_every_caption_of_an_image_survives_ingest(tmp_path: Path):
    root = _five_caption_source(tmp_path / "src")
    result = ingest(str(root), scan_source(str(root), captions_only=True), captions_only=True)
    accepted = result.accepted
    assert accepted.height == 4 * 5 + 1  # all 5 x 4 pairs plus the byte-copy's own caption
    assert accepted.group_by("image_id").len()["len"].sort().to_list() == [5, 5, 5, 6]
    # the byte-copy is the same image: its pair points at the first path holding those bytes
    copy = accepted.filter(pl.col("caption") == "another caption of image 0").row(0, named=True)
    assert copy["path"] == "img0.png" and copy["uri"].endswith("/img0.png")
    assert result.rejected.to_dicts() == [{"path": "img1.png", "reason": "duplicate_pair",
                                           "detail": "'img1.png' with caption 'caption 0 of image 1' listed more than once"}]


def test_labelled_ingest_still_rejects_repeated_paths_and_relabelled_bytes(tmp_path: Path):
    root = _five_caption_source(tmp_path / "src")
    rows = scan_source(str(root), captions_only=True).with_columns(pl.lit("circle").alias("label"))
    rows = pl.concat([rows, rows.filter(pl.col("path") == "copy_of_0.png").with_columns(pl.lit("other").alias("label"))])
    result = ingest(str(root), rows)
    assert result.accepted.height == 4  # one row per distinct path (copy_of_0 has the same bytes and label as img0)
    reasons = result.rejected["reason"].value_counts().sort("reason").rows()
    assert reasons == [("duplicate_path", 18)]


def test_unreadable_image_is_rejected_once_per_pair(tmp_path: Path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "broken.png").write_bytes(b"not a png")
    draw_shape("square", (1, 2, 3), seed=1).save(root / "ok.png")
    pl.DataFrame({"path": ["broken.png", "broken.png", "ok.png"], "caption": ["a", "b", "c"]}).write_csv(root / "manifest.csv")
    result = ingest(str(root), scan_source(str(root), captions_only=True), captions_only=True)
    assert result.accepted["caption"].to_list() == ["c"]
    assert result.rejected["path"].to_list() == ["broken.png", "broken.png"]


def _pairs(n_images: int = 400) -> pl.DataFrame:
    rows = [{"uri": f"/img/{i}.png", "caption": f"caption {c} of {i}"} for i in range(n_images) for c in range(3)]
    rows += [{"uri": f"/img/{i}.png", "caption": "A  shared   Caption"} for i in (1, 50, 399)]  # links 3 images
    rows += [{"uri": "/img/7.png", "caption": "a shared caption"}]  # same normalised caption
    return pl.DataFrame(rows)


def test_caption_split_keeps_images_and_captions_within_one_split():
    split = split_caption_pairs(_pairs(), val_fraction=0.1, test_fraction=0.3, seed=0)
    assert split.group_by("uri").agg(pl.col("split").n_unique())["split"].max() == 1
    normalised = split.with_columns(pl.col("caption").map_elements(normalise_caption, return_dtype=pl.String))
    assert normalised.group_by("caption").agg(pl.col("split").n_unique())["split"].max() == 1
    linked = split.filter(pl.col("uri").is_in([f"/img/{i}.png" for i in (1, 7, 50, 399)]))["split"]
    assert linked.n_unique() == 1  # four images joined by one (normalised) caption
    shares = split["split"].value_counts(normalize=True)
    share = dict(zip(shares["split"], shares["proportion"]))
    assert share["test"] == pytest.approx(0.3, abs=0.08) and share["val"] == pytest.approx(0.1, abs=0.05)


def test_caption_split_is_seeded_and_stable_when_pairs_are_added():
    pairs = _pairs()
    first = split_caption_pairs(pairs, val_fraction=0.1, test_fraction=0.3, seed=0)
    assert first.equals(split_caption_pairs(pairs, val_fraction=0.1, test_fraction=0.3, seed=0))
    assert not first.equals(split_caption_pairs(pairs, val_fraction=0.1, test_fraction=0.3, seed=1))
    grown = pl.concat([pairs, pl.DataFrame({"uri": ["/img/new.png"], "caption": ["a brand new caption"]})])
    after = split_caption_pairs(grown, val_fraction=0.1, test_fraction=0.3, seed=0)
    assert after.head(pairs.height).equals(first)
    with pytest.raises(ValueError, match="sum < 1"):
        split_caption_pairs(pairs, val_fraction=0.5, test_fraction=0.5)


def test_realignment_and_pool_never_see_held_out_captions():
    pairs = split_caption_pairs(_pairs(), val_fraction=0.1, test_fraction=0.3, seed=0)
    test_caption = caption_test_pairs(pairs)["caption"][0]
    train_caption = pairs.filter(pl.col("split") == "train")["caption"][0]
    splits = pl.DataFrame({"uri": ["/t/a.png", "/t/b.png", "/t/c.png", "/t/d.png"], "split": ["train", "test", "train", "val"],
                           "caption": ["a train image", "a test image", test_caption.upper(), None],
                           "label": ["cat", "dog", "cow", train_caption.title()]})
    corpus = realign_pairs(pairs, splits)
    # a train caption pair whose text is the class name of a val image is held out too
    train_pairs = pairs.filter((pl.col("split") == "train") & (pl.col("caption") != train_caption))
    assert corpus.filter(pl.col("origin") == "caption_source").height == train_pairs.height
    assert corpus.filter(pl.col("origin") == "train_split")["caption"].to_list() == ["a train image"]
    held = {normalise_caption(c) for c in pairs.filter(pl.col("split") != "train")["caption"]} | {"dog", train_caption}
    assert not {normalise_caption(c) for c in corpus["caption"]} & held
    pool = caption_pool(pairs, splits)
    assert "a train image" in pool and "a test image" not in pool
    assert not {normalise_caption(c) for c in pool} & held
    assert len(pool) == train_pairs["caption"].n_unique() + 1
    validation = realign_validation_pairs(pairs)
    assert validation.columns == ["uri", "caption"] and validation.height == pairs.filter(pl.col("split") == "val").height


def test_unsplit_caption_pairs_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="split_caption_pairs"):
        realign_pairs(_pairs(), pl.DataFrame({"uri": [], "split": [], "caption": []}, schema={c: pl.String for c in ("uri", "split", "caption")}))
    empty = split_caption_pairs(pl.DataFrame(schema={"uri": pl.String, "caption": pl.String}), val_fraction=0.1, test_fraction=0.3)
    assert empty.columns == ["uri", "caption", "split"] and caption_test_pairs(empty).height == 0


def test_the_polars_normalisation_is_the_python_one_on_every_whitespace_and_case():
    """Held-out texts are filtered in polars: its normalisation must agree with normalise_caption everywhere,
    or a held-out caption spelled with an odd space or letter case would slip into training."""
    texts = ["A  Cat", " a\tcat\n", "Straße", "ΣΊΣΥΦΟΣ ΟΔΟΣ", "İstanbul", "x\x1cy\x1fz", "a\u00a0b\u2003c\u3000d",
             "line\u2028sep\u2029par", "\x85nel\x0bvt\x0cff", "", "   ", "ＦＵＬＬ ｗｉｄｔｈ", "e\u0301 combining"]
    got = pl.DataFrame({"text": texts}).select(normalised_caption("text"))["text"].to_list()
    assert got == [normalise_caption(text) for text in texts]


def test_lazy_caption_pairs_give_the_same_realignment_corpus(tmp_path: Path):
    """A parquet scan of the corpus (how a training run reads 10⁷ pairs) gives the eager corpus, row for row."""
    pairs = split_caption_pairs(_pairs(), val_fraction=0.1, test_fraction=0.3, seed=0)
    splits = pl.DataFrame({"uri": ["/t/a.png", "/t/b.png"], "split": ["train", "test"],
                           "caption": ["a train image", pairs.filter(pl.col("split") == "train")["caption"][0].upper()],
                           "label": ["cat", "dog"]})
    pairs.write_parquet(tmp_path / "pairs.parquet")
    lazy = realign_pairs(pl.scan_parquet(tmp_path / "pairs.parquet"), splits)
    assert isinstance(lazy, pl.LazyFrame)
    eager = realign_pairs(pairs, splits)
    assert lazy.collect().equals(eager) and eager.height > 0
    assert pairs.filter(pl.col("split") == "train")["caption"][0] not in eager["caption"].to_list()  # held out by the test image
