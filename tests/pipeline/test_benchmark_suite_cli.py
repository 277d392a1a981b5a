"""``clipopt benchmark-suite`` on the tiny model: columns, skipped roots, reports, the paper's figures."""
from __future__ import annotations

import json

import pytest

from clipopt_core.cli import main as cli
from clipopt_core.models.loading import ModelSpec, export_checkpoint, load_model
from clipopt_core.suite import protocols
from clipopt_core.suite.embedding import SuiteEmbedder
from tests.benchmark_suite_data import fake_loaders, write_caption_set, write_image_set


@pytest.fixture
def roots(tmp_path, monkeypatch):
    images, captions = write_image_set(tmp_path / "gpr"), write_caption_set(tmp_path / "f30k")
    fake_loaders(monkeypatch, {"load_gpr1200": images, "load_karpathy": captions, "load_cub": images})
    (tmp_path / "roots.yaml").write_text("roots:\n  gpr1200: gpr\n  flickr30k: f30k\n  cub200: gpr\n")
    return tmp_path, images


def run(tmp, *extra) -> int:
    return cli.main(["benchmark-suite", "--model", "clipopt-tiny", "--roots", str(tmp / "roots.yaml"),
                     "--cache", str(tmp / "cache"), "--batch-size", "8", *extra])


def test_benchmark_suite_cli_writes_json_and_skips_missing_roots(roots, capsys):
    tmp, images = roots
    out = tmp / "reports" / "t1.json"
    assert run(tmp, "--columns", "t2i_flickr30k", "i2i_gpr1200", "zs_objectnet", "--out", str(out)) == 0
    printed = capsys.readouterr()
    assert "I2I GPR1200" in printed.out and "AVG (2/14)" in printed.out and "| baseline |" in printed.out
    assert "zs_objectnet: skipped: set roots.objectnet" in printed.err
    report = json.loads(out.read_text())
    columns = {c["column"]: c for c in report["columns"]}
    assert list(columns) == ["i2i_gpr1200", "zs_objectnet", "t2i_flickr30k"]  # Table 1 order
    assert columns["zs_objectnet"]["skipped"] and not columns["zs_objectnet"]["metrics"]
    base = SuiteEmbedder(load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp / "cache"))
    assert columns["i2i_gpr1200"]["metrics"]["baseline"]["map"] == pytest.approx(
        protocols.point_values(protocols.evaluate_i2i(base, images))["map"], abs=1e-6)
    assert report["paper_base"] is None and report["table"][0]["variant"] == "baseline"


def test_benchmark_suite_cli_checkpoint_against_the_papers_row(roots, capsys):
    tmp, _ = roots
    folder = export_checkpoint(load_model(ModelSpec("clipopt-tiny"), cache_dir=tmp / "cache"), tmp / "ckpt", {})
    out = tmp / "t1.md"
    assert run(tmp, "--checkpoint", str(folder), "--variant", "mcip_realign", "--paper-base", "ViT-L-14-336:openai",
               "--columns", "i2i_gpr1200", "i2i_cub200", "--out", str(out)) == 0
    md = out.read_text()
    assert md.strip() == capsys.readouterr().out.strip()
    assert "| mcip_realign · paper | 87.0 | 88.0 |" in md and "| mcip_realign · Δ |" in md and "I2I (2/4)" in md
    # the checkpoint's weights file with its open_clip name evaluates the same weights
    as_file = tmp / "file.json"
    assert run(tmp, "--checkpoint", str(folder / "open_clip_model.safetensors"), "--columns", "i2i_gpr1200",
               "--out", str(as_file)) == 0
    report = json.loads(as_file.read_text())
    assert report["variant"] == "checkpoint" and report["paper_base"] is None
    assert f"| checkpoint | {report['table'][0]['i2i_gpr1200']:.1f} |" in md.replace("mcip_realign", "checkpoint")


@pytest.mark.parametrize("extra, message", [
    (["--columns", "imagenet"], "unknown benchmark column 'imagenet'"),
    (["--out", "t1.txt"], "--out must end in .md or .json"),
    (["--paper-base", "ViT-B-32:laion"], "not a base model of the paper"),
])
def test_benchmark_suite_cli_bad_input_names_the_fix(roots, capsys, extra, message):
    tmp, _ = roots
    assert run(tmp, *extra) == 2
    assert message in capsys.readouterr().err


def test_benchmark_suite_cli_missing_roots_file(tmp_path, capsys):
    assert cli.main(["benchmark-suite", "--model", "clipopt-tiny", "--roots", str(tmp_path / "none.yaml")]) == 2
    assert "roots file" in capsys.readouterr().err
