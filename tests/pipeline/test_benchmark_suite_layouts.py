"""All 14 Table 1 columns end to end: the official layouts in miniature → the real loaders → ``clipopt benchmark-suite``.

The miniature layouts are the loaders' own (``tests/unit/test_benchmark_suite_loaders.py``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from clipopt_core.cli import main as cli
from clipopt_core.suite.columns import COLUMN_NAMES
from tests.unit import test_benchmark_suite_loaders as layouts

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def imagenet_layouts(tmp: Path) -> dict[str, Path]:
    """Three classes (two of them ImageNet-A classes) in train, val, Sketch and A folder layouts."""
    for i, wnid in enumerate(("n01498041", "n12267677", "n01443537")):
        for k in range(3):
            layouts.image(tmp / "in1k" / "train" / wnid / f"{wnid}_{k}.JPEG", size=(20, 16), colour=COLOURS[i])
        layouts.image(tmp / "in1k" / "val" / wnid / f"ILSVRC2012_val_{i}.JPEG", size=(20, 16), colour=COLOURS[i])
        layouts.image(tmp / "sk" / wnid / f"s{i}.JPEG", colour=COLOURS[i])
        if i < 2:
            layouts.image(tmp / "ina" / wnid / f"a{i}.jpg", colour=COLOURS[i])
    return {"imagenet": tmp / "in1k", "imagenet_sketch": tmp / "sk", "imagenet_a": tmp / "ina"}


def test_benchmark_suite_every_column_from_the_official_layouts(tmp_path):
    roots = {"gpr1200": layouts.gpr1200_layout(tmp_path / "gpr"), "instre": layouts.instre_layout(tmp_path / "instre"),
             "cub200": layouts.cub_layout(tmp_path / "cub"), "roxford5k": layouts.revisited_layout(tmp_path / "rev"),
             "objectnet": layouts.objectnet_layout(tmp_path / "on"), "aircraft": layouts.aircraft_layout(tmp_path / "air"),
             "flickr30k": layouts.karpathy_layout(tmp_path / "kp"), "coco": tmp_path / "kp", **imagenet_layouts(tmp_path)}
    for path in [*(tmp_path / "on").rglob("*.png"), *(tmp_path / "on").rglob("*.jpg"), *(tmp_path / "air").rglob("*.jpg")]:
        layouts.image(path, size=(40, 40))  # their border/banner crops must leave the 8 px an image needs
    (tmp_path / "roots.yaml").write_text(json.dumps({key: str(path) for key, path in roots.items()}))
    out = tmp_path / "t1.json"
    assert cli.main(["benchmark-suite", "--model", "clipopt-tiny", "--roots", str(tmp_path / "roots.yaml"),
                     "--cache", str(tmp_path / "cache"), "--batch-size", "8", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [c["column"] for c in report["columns"]] == list(COLUMN_NAMES)
    assert not [c["column"] for c in report["columns"] if c["skipped"]]
    row = report["table"][0]
    assert all(0.0 <= row[name] <= 100.0 for name in COLUMN_NAMES)
    assert row["avg"] == pytest.approx(sum(row[name] for name in COLUMN_NAMES) / 14)
    revisited = report["columns"][3]["metrics"]["baseline"]
    assert set(revisited) == {"easy", "medium", "hard"} and not any(math.isnan(v) for v in revisited.values())
