"""Benchmark loaders against miniature synthetic copies of each official layout, generated here.

Each layout is written with the real file formats (txt/csv/json/pkl, JPEG/PNG images), loaded, then
changed (an image moved, a split edited) and broken (a file removed, a hostile pickle).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipopt_core.data.datasets import load_image
from clipopt_core.suite.datasets import (
    IMAGENET_A_WNIDS,
    IMAGENET_CLASSNAMES,
    IMAGENET_WNIDS,
    LOADERS,
    imagenet_a_class_ids,
    load_aircraft,
    load_cub,
    load_gpr1200,
    load_imagenet,
    load_imagenet_a,
    load_imagenet_sketch,
    load_instre,
    load_karpathy,
    load_objectnet,
    load_revisited,
)
from clipopt_core.suite.types import BenchmarkLayoutError


def image(path: Path, size: tuple[int, int] = (12, 10), colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A tiny image at ``path`` (format from the suffix; ``.JPEG`` is JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def names(paths: tuple[str, ...]) -> list[str]:
    return [Path(p).name for p in paths]


# ---------------------------------------------------------------- GPR1200
def gpr1200_layout(root: Path) -> Path:
    for category in (2, 10):
        for name in ("b", "a"):
            image(root / "images" / f"{category}_{name}.jpg")
    (root / "images" / "README.txt").write_text("not an image")
    return root


def test_gpr1200_labels_by_numeric_category_and_accepts_the_images_folder(tmp_path: Path) -> None:
    root = gpr1200_layout(tmp_path / "GPR1200")
    loaded = load_gpr1200(str(root))
    assert names(loaded.uris) == ["2_a.jpg", "2_b.jpg", "10_a.jpg", "10_b.jpg"]  # numeric, not "10" < "2"
    assert loaded.labels.tolist() == [0, 0, 1, 1] and loaded.class_names == ("2", "10") and loaded.crops is None
    assert load_gpr1200(str(root / "images")).uris == loaded.uris
    load_image(loaded.uris[0])  # the URIs open
    (root / "images" / "2_b.jpg").rename(root / "images" / "10_c.jpg")
    assert load_gpr1200(str(root)).labels.tolist() == [0, 1, 1, 1]


def test_gpr1200_missing_root_and_misnamed_image_are_named(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkLayoutError, match=r"nowhere.*does not exist.*GPR1200\.zip"):
        load_gpr1200(str(tmp_path / "nowhere"))
    root = gpr1200_layout(tmp_path / "GPR1200")
    image(root / "images" / "stray.jpg")
    with pytest.raises(BenchmarkLayoutError, match=r"stray\.jpg is not named <category id>_<name>\.jpg"):
        load_gpr1200(str(root))


# ---------------------------------------------------------------- INSTRE
def instre_layout(root: Path) -> Path:
    for folder in ("INSTRE-S1/01a_canada_book", "INSTRE-S1/01b_mug", "INSTRE-S2/02a_logo", "INSTRE-M/01"):
        for n in ("001", "002"):
            image(root / folder / f"{n}.jpg")
            (root / folder / f"{n}.txt").write_text("10 10 50 50\n")  # the official per-image boxes
    return root


def test_instre_classes_are_object_folders_in_subset_order(tmp_path: Path) -> None:
    root = instre_layout(tmp_path / "INSTRE")
    loaded = load_instre(str(root))
    assert loaded.class_names == ("INSTRE-S1/01a_canada_book", "INSTRE-S1/01b_mug", "INSTRE-S2/02a_logo", "INSTRE-M/01")
    assert loaded.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and all(u.endswith(".jpg") for u in loaded.uris)
    shutil.move(root / "INSTRE-S1/01a_canada_book/002.jpg", root / "INSTRE-S2/02a_logo/003.jpg")
    assert load_instre(str(root)).labels.tolist() == [0, 1, 1, 2, 2, 2, 3, 3]


def test_instre_missing_subset_is_named(tmp_path: Path) -> None:
    root = instre_layout(tmp_path / "INSTRE")
    shutil.rmtree(root / "INSTRE-M")
    with pytest.raises(BenchmarkLayoutError, match=r"missing folder .*INSTRE/INSTRE-M;.*INSTRE-S1"):
        load_instre(str(root))


# ---------------------------------------------------------------- CUB-200-2011
def cub_layout(root: Path) -> Path:
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    rows = [(i + 1, c, f"{c}/{c.split('.')[1]}_{k}.jpg", k % 2) for i, c in enumerate(classes) for k in range(2)]
    rows = [(n + 1, *row) for n, row in enumerate(rows)]
    for _, _, _, rel, _ in rows:
        image(root / "images" / rel)
    (root / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    (root / "images.txt").write_text("".join(f"{n} {rel}\n" for n, _, _, rel, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{n} {c}\n" for n, c, _, _, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{n} {t}\n" for n, _, _, _, t in rows))
    return root


def test_cub_splits_labels_and_clean_class_names(tmp_path: Path) -> None:
    root = cub_layout(tmp_path / "CUB_200_2011")
    test = load_cub(str(root))
    assert test.class_names == ("Black footed Albatross", "Laysan Albatross", "Sooty Albatross")
    assert test.labels.tolist() == [0, 1, 2] and names(test.uris)[0] == "Black_footed_Albatross_0.jpg"
    assert load_cub(str(root), "train").labels.tolist() == [0, 1, 2]
    assert len(load_cub(str(root), "all").uris) == 6
    (root / "train_test_split.txt").write_text("1 0\n2 0\n3 0\n4 1\n5 0\n6 1\n")  # image 2 moves to test
    assert load_cub(str(root)).labels.tolist() == [0, 0, 1, 2]


def test_cub_malformed_row_and_missing_file_are_named(tmp_path: Path) -> None:
    root = cub_layout(tmp_path / "CUB_200_2011")
    lines = (root / "image_class_labels.txt").read_text().splitlines()
    (root / "image_class_labels.txt").write_text("\n".join(lines[:2] + ["3"] + lines[3:]) + "\n")
    with pytest.raises(BenchmarkLayoutError, match=r"image_class_labels\.txt:3: expected 2 fields"):
        load_cub(str(root))
    (root / "image_class_labels.txt").write_text("\n".join(lines[:2] + ["3 x"] + lines[3:]) + "\n")
    with pytest.raises(BenchmarkLayoutError, match=r"image_class_labels\.txt:3: 'x' is not an integer"):
        load_cub(str(root))
    (root / "image_class_labels.txt").write_text("\n".join(lines[:2] + ["3 9"] + lines[3:]) + "\n")
    with pytest.raises(BenchmarkLayoutError, match=r"image id 3 .* value 9"):
        load_cub(str(root))
    (root / "train_test_split.txt").unlink()
    with pytest.raises(BenchmarkLayoutError, match=r"missing file .*CUB_200_2011/train_test_split\.txt;.*CUB_200_2011\.tgz"):
        load_cub(str(root))


# ---------------------------------------------------------------- revisited Oxford / Paris
def revisited_gnd() -> dict:
    return {"imlist": ["all_souls_000001", "all_souls_000002", "balliol_000001", "radcliffe_000001"],
            "qimlist": ["all_souls_000013", "radcliffe_000009"],
            "gnd": [{"bbx": [1.5, 2.0, 30.0, 40.0], "easy": [0], "hard": np.array([1]), "junk": [2]},
                    {"bbx": np.array([3.0, 4.0, 5.0, 6.0]), "easy": np.array([3], dtype=np.int32), "hard": [],
                     "junk": []}]}


def revisited_layout(root: Path, protocol: int = 2) -> Path:
    gnd = revisited_gnd()
    for name in gnd["imlist"] + gnd["qimlist"]:
        image(root / "roxford5k" / "jpg" / f"{name}.jpg")
    (root / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd, protocol=protocol))
    return root


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_revisited_ground_truth_from_the_pickle(tmp_path: Path, protocol: int) -> None:
    root = revisited_layout(tmp_path / "datasets", protocol)
    loaded = load_revisited(str(root), "roxford5k")
    assert names(loaded.database) == ["all_souls_000001.jpg", "all_souls_000002.jpg", "balliol_000001.jpg",
                                      "radcliffe_000001.jpg"]
    assert names(loaded.queries) == ["all_souls_000013.jpg", "radcliffe_000009.jpg"]
    assert all("/roxford5k/jpg/" in uri for uri in loaded.database + loaded.queries)
    np.testing.assert_array_equal(loaded.query_boxes, [[1.5, 2.0, 30.0, 40.0], [3.0, 4.0, 5.0, 6.0]])
    assert [e.tolist() for e in loaded.easy] == [[0], [3]] and [h.tolist() for h in loaded.hard] == [[1], []]
    assert [j.tolist() for j in loaded.junk] == [[2], []] and loaded.easy[1].dtype == np.int64
    assert load_revisited(str(root / "roxford5k"), "roxford5k").easy[1].tolist() == [3]  # root = dataset folder


def test_revisited_changed_ground_truth_changes_the_set(tmp_path: Path) -> None:
    root = revisited_layout(tmp_path / "datasets")
    gnd = revisited_gnd()
    gnd["gnd"][0]["junk"] = [1, 2]
    (root / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd))
    assert load_revisited(str(root), "roxford5k").junk[0].tolist() == [1, 2]
    gnd["gnd"][1]["easy"] = [4]  # imlist has 4 images: index 4 is out of range
    (root / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd))
    with pytest.raises(BenchmarkLayoutError, match=r"gnd_roxford5k\.pkl: gnd\[1\]\['easy'\] indexes outside"):
        load_revisited(str(root), "roxford5k")


class _Hostile:
    def __init__(self, call: object, argument: str) -> None:
        self.call, self.argument = call, argument

    def __reduce__(self) -> tuple:
        return self.call, (self.argument,)


@pytest.mark.parametrize("call", ["system", "eval"])
def test_revisited_hostile_pickle_is_refused_and_nothing_runs(tmp_path: Path, call: str) -> None:
    root = revisited_layout(tmp_path / "datasets")
    marker = tmp_path / "pwned"
    payload = (_Hostile(os.system, f"touch {marker}") if call == "system"
               else _Hostile(eval, f"__import__('pathlib').Path({str(marker)!r}).touch()"))
    gnd = revisited_gnd()
    gnd["gnd"][0]["easy"] = payload
    (root / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd, protocol=2))
    with pytest.raises(BenchmarkLayoutError, match=rf"gnd_roxford5k\.pkl: refused to unpickle \w+\.{call}"):
        load_revisited(str(root), "roxford5k")
    assert not marker.exists()


def test_revisited_missing_and_truncated_pickle_are_named(tmp_path: Path) -> None:
    root = revisited_layout(tmp_path / "datasets")
    pkl = root / "roxford5k" / "gnd_roxford5k.pkl"
    pkl.write_bytes(pkl.read_bytes()[:40])
    with pytest.raises(BenchmarkLayoutError, match=r"gnd_roxford5k\.pkl: not a readable pickle"):
        load_revisited(str(root), "roxford5k")
    with pytest.raises(BenchmarkLayoutError, match=r"missing file .*rparis6k/gnd_rparis6k\.pkl.*revisitop"):
        load_revisited(str(root), "rparis6k")
    shutil.rmtree(root / "roxford5k" / "jpg")
    pkl.write_bytes(pickle.dumps(revisited_gnd()))
    with pytest.raises(BenchmarkLayoutError, match=r"missing folder .*roxford5k/jpg"):
        load_revisited(str(root), "roxford5k")


# ---------------------------------------------------------------- ImageNet, -Sketch, -A
def test_imagenet_class_lists_are_openais_names_in_sorted_wnid_order() -> None:
    import open_clip

    assert IMAGENET_CLASSNAMES == tuple(open_clip.IMAGENET_CLASSNAMES) and IMAGENET_CLASSNAMES[0] == "tench"
    assert list(IMAGENET_WNIDS) == sorted(set(IMAGENET_WNIDS)) and len(IMAGENET_WNIDS) == 1000
    assert IMAGENET_WNIDS[0] == "n01440764" and IMAGENET_WNIDS[999] == "n15075141"
    ids = imagenet_a_class_ids()
    assert ids.shape == (200,) and [IMAGENET_WNIDS[i] for i in ids] == list(IMAGENET_A_WNIDS)


def test_imagenet_train_wnid_folders_and_kaggle_layout(tmp_path: Path) -> None:
    for wnid, count in (("n01443537", 2), ("n01440764", 1)):
        for k in range(count):
            image(tmp_path / "in1k" / "train" / wnid / f"{wnid}_{k}.JPEG")
    loaded = load_imagenet(str(tmp_path / "in1k"), "train")
    assert loaded.labels.tolist() == [0, 1, 1] and loaded.class_names == IMAGENET_CLASSNAMES
    shutil.move(tmp_path / "in1k" / "train", tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC" / "train")
    assert load_imagenet(str(tmp_path / "kaggle"), "train").labels.tolist() == [0, 1, 1]
    image(tmp_path / "in1k" / "val" / "n01484850" / "ILSVRC2012_val_00000001.JPEG")  # val sorted by valprep.sh
    assert load_imagenet(str(tmp_path / "in1k"), "val").labels.tolist() == [2]
    image(tmp_path / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC" / "train" / "n99999999" / "x.JPEG")
    with pytest.raises(BenchmarkLayoutError, match=r"train/n99999999 is not a class \(wnid\) of imagenet_train"):
        load_imagenet(str(tmp_path / "kaggle"), "train")
    with pytest.raises(BenchmarkLayoutError, match=r"missing folder .*kaggle/val .*LOC_val_solution\.csv"):
        load_imagenet(str(tmp_path / "kaggle"), "val")


def test_imagenet_flat_val_is_labelled_from_loc_val_solution(tmp_path: Path) -> None:
    root = tmp_path / "in1k"
    for n in (1, 2, 3):
        image(root / "val" / f"ILSVRC2012_val_0000000{n}.JPEG")
    solution = ["ImageId,PredictionString", "ILSVRC2012_val_00000002,n01443537 1 2 3 4 n01443537 5 6 7 8",
                "ILSVRC2012_val_00000001,n01484850 1 2 3 4", "ILSVRC2012_val_00000003,n15075141 0 0 1 1"]
    (root / "LOC_val_solution.csv").write_text("\n".join(solution) + "\n")
    assert load_imagenet(str(root)).labels.tolist() == [2, 1, 999]
    solution[3] = "ILSVRC2012_val_00000003,n01440764 0 0 1 1"
    (root / "LOC_val_solution.csv").write_text("\n".join(solution) + "\n")
    assert load_imagenet(str(root), "val").labels.tolist() == [2, 1, 0]
    (root / "LOC_val_solution.csv").write_text("\n".join(solution[:3] + ["ILSVRC2012_val_00000003"]) + "\n")
    with pytest.raises(BenchmarkLayoutError, match=r"LOC_val_solution\.csv:4: expected '<ImageId>,<wnid>"):
        load_imagenet(str(root))
    (root / "LOC_val_solution.csv").write_text("\n".join(solution[:3]) + "\n")
    with pytest.raises(BenchmarkLayoutError, match=r"ILSVRC2012_val_00000003\.JPEG has no row in .*LOC_val_solution"):
        load_imagenet(str(root))
    (root / "LOC_val_solution.csv").unlink()
    with pytest.raises(BenchmarkLayoutError, match=r"flat val.*neither .*LOC_val_solution\.csv nor the devkit"):
        load_imagenet(str(root))


def test_imagenet_flat_val_is_labelled_from_the_official_devkit(tmp_path: Path) -> None:
    from scipy.io import savemat

    root = tmp_path / "in1k"
    for n in (1, 2):
        image(root / "val" / f"ILSVRC2012_val_0000000{n}.JPEG")
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    # devkit ids are not the sorted-wnid order: id 1 = kit fox, id 2 = tench; id 1001 is an inner synset
    synsets = np.array([(1, "n02119789", "kit fox", 0), (2, "n01440764", "tench", 0), (1001, "n00001740", "entity", 2)],
                       dtype=[("ILSVRC2012_ID", "i4"), ("WNID", "U9"), ("words", "U9"), ("num_children", "i4")])
    savemat(data / "meta.mat", {"synsets": synsets.reshape(-1, 1)})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n")
    assert load_imagenet(str(root)).labels.tolist() == [0, IMAGENET_WNIDS.index("n02119789")]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n1001\n")
    with pytest.raises(BenchmarkLayoutError, match=r"ground_truth\.txt:2: ILSVRC2012_ID 1001 is not a leaf synset"):
        load_imagenet(str(root))
    (data / "meta.mat").write_bytes(b"not a mat file")
    with pytest.raises(BenchmarkLayoutError, match=r"meta\.mat is not the devkit's synset table"):
        load_imagenet(str(root))


def test_imagenet_sketch_and_a_wnid_folders(tmp_path: Path) -> None:
    image(tmp_path / "sk" / "sketch" / "n01443537" / "sketch_0.JPEG")
    image(tmp_path / "sk" / "sketch" / "n01440764" / "sketch_1.JPEG")
    assert load_imagenet_sketch(str(tmp_path / "sk")).labels.tolist() == [0, 1]
    assert load_imagenet_sketch(str(tmp_path / "sk" / "sketch")).labels.tolist() == [0, 1]
    image(tmp_path / "ina" / "imagenet-a" / "n01498041" / "0.jpg")
    image(tmp_path / "ina" / "imagenet-a" / "n12267677" / "1.jpg")
    (tmp_path / "ina" / "imagenet-a" / "README.txt").write_text("ImageNet-A")
    loaded = load_imagenet_a(str(tmp_path / "ina"))
    assert loaded.labels.tolist() == [6, 988] and len(loaded.class_names) == 1000
    assert set(loaded.labels.tolist()) <= set(imagenet_a_class_ids().tolist())
    image(tmp_path / "ina" / "imagenet-a" / "n01440764" / "2.jpg")  # tench is not an ImageNet-A class
    with pytest.raises(BenchmarkLayoutError, match=r"imagenet-a/n01440764 is not a class \(wnid\) of imagenet_a"):
        load_imagenet_a(str(tmp_path / "ina"))


# ---------------------------------------------------------------- ObjectNet
def objectnet_layout(root: Path) -> Path:
    top = root / "objectnet-1.0"
    folders = {"alarm_clock": "Alarm clock", "air_freshener": "Air freshener", "banana": "Banana"}
    (top / "mappings").mkdir(parents=True)
    (top / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps(folders))
    (top / "mappings" / "objectnet_to_imagenet_1k.json").write_text(
        json.dumps({"Banana": "banana", "Alarm clock": "analog clock; digital clock"}))
    image(top / "images" / "alarm_clock" / "a.png", (10, 8))
    image(top / "images" / "banana" / "b.png", (12, 9))
    image(top / "images" / "banana" / "c.png", (7, 5))
    image(top / "images" / "air_freshener" / "d.png", (9, 9))
    return root


def test_objectnet_keeps_the_imagenet_classes_and_crops_the_border(tmp_path: Path) -> None:
    root = objectnet_layout(tmp_path / "on")
    loaded = load_objectnet(str(root))
    assert loaded.class_names == ("alarm clock", "banana") and names(loaded.uris) == ["a.png", "b.png", "c.png"]
    assert loaded.labels.tolist() == [0, 1, 1]
    np.testing.assert_array_equal(loaded.crops, [[1, 1, 9, 7], [1, 1, 11, 8], [1, 1, 6, 4]])
    assert load_objectnet(str(root / "objectnet-1.0"), crop_border=False).crops is None
    shutil.move(root / "objectnet-1.0/images/banana/c.png", root / "objectnet-1.0/images/alarm_clock/c.png")
    assert load_objectnet(str(root)).labels.tolist() == [0, 0, 1]


def test_objectnet_missing_mapping_is_named(tmp_path: Path) -> None:
    root = objectnet_layout(tmp_path / "on")
    (root / "objectnet-1.0/mappings/objectnet_to_imagenet_1k.json").write_text("{\n  \"Banana\": \n")
    with pytest.raises(BenchmarkLayoutError, match=r"objectnet_to_imagenet_1k\.json:3: not valid JSON"):
        load_objectnet(str(root))
    (root / "objectnet-1.0/mappings/objectnet_to_imagenet_1k.json").unlink()
    with pytest.raises(BenchmarkLayoutError, match=r"missing file .*mappings/objectnet_to_imagenet_1k\.json;.*objectnet"):
        load_objectnet(str(root))


# ---------------------------------------------------------------- FGVC-Aircraft
def aircraft_layout(root: Path) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nCessna 172\nA300B4\n")
    (data / "images_variant_trainval.txt").write_text("0034309 707-320\n0034958 Cessna 172\n")
    (data / "images_variant_test.txt").write_text("1514522 A300B4\n0062765 Cessna 172\n")
    for image_id, size in (("0034309", (30, 40)), ("0034958", (30, 40)), ("1514522", (50, 45)), ("0062765", (40, 30))):
        image(data / "images" / f"{image_id}.jpg", size)
    return root


def test_aircraft_variants_with_spaces_and_the_banner_crop(tmp_path: Path) -> None:
    root = aircraft_layout(tmp_path / "air")
    test = load_aircraft(str(root))
    assert test.class_names == ("707-320", "Cessna 172", "A300B4") and test.labels.tolist() == [2, 1]
    assert names(test.uris) == ["1514522.jpg", "0062765.jpg"]
    np.testing.assert_array_equal(test.crops, [[0, 0, 50, 25], [0, 0, 40, 10]])
    trainval = load_aircraft(str(root / "fgvc-aircraft-2013b"), "trainval", crop_banner=False)
    assert trainval.labels.tolist() == [0, 1] and trainval.crops is None
    (root / "fgvc-aircraft-2013b/data/images_variant_test.txt").write_text("1514522 707-320\n")
    assert load_aircraft(str(root)).labels.tolist() == [0]


def test_aircraft_unknown_variant_and_missing_image_are_named(tmp_path: Path) -> None:
    root = aircraft_layout(tmp_path / "air")
    listing = root / "fgvc-aircraft-2013b/data/images_variant_test.txt"
    listing.write_text("1514522 A300B4\n0062765 Cessna 999\n")
    with pytest.raises(BenchmarkLayoutError, match=r"images_variant_test\.txt:2: variant 'Cessna 999' is not in"):
        load_aircraft(str(root))
    listing.write_text("1514522 A300B4\n0000001 A300B4\n")
    with pytest.raises(BenchmarkLayoutError, match=r"cannot read image .*data/images/0000001\.jpg"):
        load_aircraft(str(root))


# ---------------------------------------------------------------- Karpathy Flickr30k / COCO
def karpathy_entry(filename: str, split: str, captions: int, filepath: str | None = None) -> dict:
    entry = {"filename": filename, "split": split, "imgid": 0,
             "sentences": [{"raw": f" {filename} caption {k}. ", "tokens": []} for k in range(captions)]}
    return entry | ({"filepath": filepath} if filepath else {})


def karpathy_layout(root: Path) -> Path:
    flickr = [karpathy_entry("1000.jpg", "train", 5), karpathy_entry("2000.jpg", "test", 5),
              karpathy_entry("3000.jpg", "test", 5)]
    coco = [karpathy_entry("COCO_val2014_000000000042.jpg", "test", 7, "val2014"),
            karpathy_entry("COCO_train2014_000000000009.jpg", "restval", 5, "train2014")]
    for dataset, images in (("flickr30k", flickr), ("coco", coco)):
        (root / f"dataset_{dataset}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"dataset_{dataset}.json").write_text(json.dumps({"images": images, "dataset": dataset}))
    for entry in flickr:
        image(root / "flickr30k-images" / entry["filename"])
    for entry in coco:
        image(root / entry["filepath"] / entry["filename"])
    return root


def test_karpathy_test_split_with_five_captions_per_image(tmp_path: Path) -> None:
    root = karpathy_layout(tmp_path / "karpathy")
    flickr = load_karpathy(str(root), "flickr30k")
    assert names(flickr.images) == ["2000.jpg", "3000.jpg"] and all("flickr30k-images/" in u for u in flickr.images)
    assert flickr.caption_image.tolist() == [0] * 5 + [1] * 5 and flickr.captions[5] == "3000.jpg caption 0."
    coco = load_karpathy(str(root), "coco")
    assert coco.images[0].endswith("val2014/COCO_val2014_000000000042.jpg") and len(coco.captions) == 5
    assert len(load_karpathy(str(root), "coco", captions_per_image=None).captions) == 7
    assert len(load_karpathy(str(root), "coco", split="restval").images) == 1
    data = json.loads((root / "dataset_flickr30k.json").read_text())
    data["images"][0]["split"] = "test"
    (root / "dataset_flickr30k.json").write_text(json.dumps(data))
    assert load_karpathy(str(root), "flickr30k").caption_image.tolist() == [0] * 5 + [1] * 5 + [2] * 5


def test_karpathy_missing_images_folder_and_malformed_json_are_named(tmp_path: Path) -> None:
    root = karpathy_layout(tmp_path / "karpathy")
    shutil.rmtree(root / "flickr30k-images")
    with pytest.raises(BenchmarkLayoutError, match=r"missing folder .*karpathy/flickr30k-images;"):
        load_karpathy(str(root), "flickr30k")
    (root / "dataset_coco.json").write_text('{"images": [{"split": "test", "filename": "x.jpg"}]}')
    with pytest.raises(BenchmarkLayoutError, match=r"dataset_coco\.json: images\[0\] lacks filename/sentences"):
        load_karpathy(str(root), "coco")
    (root / "dataset_coco.json").unlink()
    with pytest.raises(BenchmarkLayoutError, match=r"missing file .*dataset_coco\.json;.*caption_datasets\.zip"):
        load_karpathy(str(root), "coco")


# ---------------------------------------------------------------- the registry
def test_loaders_registry_loads_every_benchmark_from_its_root_alone(tmp_path: Path) -> None:
    roots = {"gpr1200": gpr1200_layout(tmp_path / "gpr"), "instre": instre_layout(tmp_path / "instre"),
             "cub200": cub_layout(tmp_path / "cub"), "roxford5k": revisited_layout(tmp_path / "rev"),
             "objectnet": objectnet_layout(tmp_path / "on"), "aircraft": aircraft_layout(tmp_path / "air"),
             "flickr30k": karpathy_layout(tmp_path / "kp"), "coco": tmp_path / "kp"}
    for key, root in roots.items():
        loaded = LOADERS[key](f"file://{root}")  # a URL root: the path any fsspec protocol takes
        uris = getattr(loaded, "uris", None) or getattr(loaded, "database", None) or loaded.images
        assert uris and all(u.startswith("file://") for u in uris), key
        load_image(uris[0])


@pytest.mark.parametrize("key", sorted(LOADERS))
def test_every_loader_names_a_missing_root(tmp_path: Path, key: str) -> None:
    with pytest.raises(BenchmarkLayoutError, match=r"absent does not exist or is not a folder; download"):
        LOADERS[key](str(tmp_path / "absent"))


def test_loaders_read_a_non_local_fsspec_root(tmp_path: Path) -> None:
    """The same layouts under ``memory://`` (the code path of ``s3://``: protocol kept, no os calls)."""
    import fsspec

    memory = fsspec.filesystem("memory")
    layouts = {"gpr1200": gpr1200_layout, "cub200": cub_layout, "aircraft": aircraft_layout,
               "roxford5k": revisited_layout, "instre": instre_layout}
    try:
        for key, build in layouts.items():
            local = build(tmp_path / key)
            memory.put(str(local), f"/suite/{key}", recursive=True)
            loaded = LOADERS[key](f"memory://suite/{key}")
            local_set = LOADERS[key](str(local))
            uris = getattr(loaded, "uris", None) or loaded.database
            assert all(u.startswith("memory://") and f"/suite/{key}/" in u for u in uris), key
            assert [u.split(f"/{key}/", 1)[1] for u in uris] == \
                [u.split(f"/{key}/", 1)[1] for u in (getattr(local_set, "uris", None) or local_set.database)]
            load_image(uris[-1])
        with pytest.raises(BenchmarkLayoutError, match=r"memory:///suite/absent does not exist"):
            load_cub("memory://suite/absent")
    finally:
        memory.rm("/suite", recursive=True)
