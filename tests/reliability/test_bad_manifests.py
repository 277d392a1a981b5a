"""Bad manifests at the asset level: missing columns, paths escaping the root, singleton classes.

Row-level rejection reasons are unit-tested in tests/unit/test_data.py (``hostile_source``);
here the runs themselves are checked, and "never read" is *proven* with FIFOs: a process that
opens a FIFO for reading blocks until a writer appears, and a writer opening with
``O_NONBLOCK`` succeeds only while a reader has it open. A watcher thread that keeps trying
therefore catches every open of the bait files, by anyone, without the run ever hanging.
"""
from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import polars as pl
import pytest

from clipopt_core.runtime.storage import ArtifactStore
from tests.conftest import draw_shape, write_shapes_source
from tests.reliability.conftest import DATA_ASSETS, failure_text, materialize, metadata


class FifoWatcher:
    """Opens each FIFO for writing (non-blocking) every few ms; records which ones had a reader."""

    def __init__(self, fifos: list[Path]) -> None:
        self.fifos, self.opened = fifos, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for fifo in self.fifos:
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: nobody is reading, as it should be
                        raise
                    continue
                self.opened.add(fifo.name)
                try:
                    os.write(fd, b"bait")  # feed and close: the reader gets EOF instead of hanging
                except OSError:  # the reader already gave up (EPIPE): it was opened all the same
                    pass
                finally:
                    os.close(fd)
            self._stop.wait(0.005)

    def __enter__(self) -> "FifoWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.parametrize("missing", ["label", "path"])
def test_missing_column_fails_naming_it(tmp_path: Path, missing: str):
    root = write_shapes_source(tmp_path / "src", per_class=1)
    pl.read_csv(root / "manifest.csv").drop(missing).write_csv(root / "manifest.csv")
    result = materialize(DATA_ASSETS, tmp_path, root)
    assert not result.success
    assert [e.step_key for e in result.get_step_failure_events()] == ["raw_images"]
    text = failure_text(result)
    assert f"lacks column(s) ['{missing}']" in text and "required ['path', 'label']" in text
    assert not ArtifactStore(f"file://{tmp_path / 'artifacts'}").exists("data/raw_images.parquet")


def test_fifo_watcher_catches_a_reader(tmp_path: Path):
    """Control: the detector used below really sees an open-for-read."""
    fifo = tmp_path / "bait.png"
    os.mkfifo(fifo)
    with FifoWatcher([fifo]) as watcher:
        assert fifo.read_bytes() == b"bait"
    assert watcher.opened == {"bait.png"}


def test_escaping_paths_are_rejected_and_never_opened(tmp_path: Path):
    root = write_shapes_source(tmp_path / "src", per_class=2)
    outside = tmp_path / "outside"
    outside.mkdir()
    baits = [outside / "secret.png", outside / "secret2.png", outside / "secret3.png", root / "inside_fifo.png"]
    for fifo in baits:
        os.mkfifo(fifo)
    draw_shape("circle", (1, 2, 3), 7).save(outside / "real.png")  # a valid image outside the root
    os.symlink(outside / "secret2.png", root / "link.png")
    os.symlink(outside, root / "escape_dir")
    os.symlink(outside / "real.png", root / "real_link.png")
    (root / "lonely").mkdir()
    for number in range(3):  # three classes with a single image each
        draw_shape("square", (10, 20 * number, 200), 100 + number).save(root / "lonely" / f"{number}.png")
    escaping = {
        "../outside/secret.png": "path_escapes_root",
        str(outside / "secret3.png"): "path_escapes_root",
        "link.png": "path_escapes_root",
        "escape_dir/secret.png": "path_escapes_root",
        "real_link.png": "path_escapes_root",
        "inside_fifo.png": "not_a_regular_file",
    }
    rows = pl.read_csv(root / "manifest.csv").select("path", "label").to_dicts()
    rows += [{"path": path, "label": "stolen"} for path in escaping]
    rows += [{"path": f"lonely/{n}.png", "label": f"lonely {n}"} for n in range(3)]
    pl.DataFrame(rows).write_csv(root / "manifest.csv")

    with FifoWatcher(baits) as watcher:
        result = materialize(DATA_ASSETS, tmp_path, root)
    assert result.success, failure_text(result)
    assert watcher.opened == set(), f"bait files were opened: {watcher.opened}"

    store = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    rejected = store.read_parquet("data/rejected.parquet")
    assert dict(zip(rejected["path"], rejected["reason"])) == escaping
    accepted = store.read_parquet("data/manifest.parquet")
    assert "stolen" not in accepted["label"].to_list()
    assert all(uri.startswith(str(root) + "/") for uri in accepted["uri"])
    meta = metadata(result, "image_manifest")
    assert meta["singleton_classes"] == 3 and meta["classes"] == 16 + 3 and meta["rejected"] == len(escaping)


def test_symlinked_root_itself_is_fine(tmp_path: Path):
    """Resolving symlinks must not reject a source whose *root* is reached through a symlink."""
    real = write_shapes_source(tmp_path / "real", per_class=2)
    os.symlink(real, tmp_path / "alias")
    result = materialize(DATA_ASSETS, tmp_path, tmp_path / "alias")
    assert result.success, failure_text(result)
    assert metadata(result, "image_manifest")["rejected"] == 0
    shutil.rmtree(tmp_path / "artifacts")
