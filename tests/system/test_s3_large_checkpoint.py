"""A real-size checkpoint (randomly initialised ViT-B-32, ≈ 600 MB) through the artifact store on real S3.

S3 writes go straight to the final key (multipart upload above s3fs' block size, atomic at completion);
this uploads the folder with ``put_dir``, reads it back with ``get_dir`` (hash-checked against the
``_COMPLETE.json`` marker), and checks that no temp object or copy was made. Prints the throughput.
"""
from __future__ import annotations

import time

import pytest

from clipopt_core.runtime.storage import COMPLETE_MARKER, ArtifactStore, sha256_file

pytestmark = [pytest.mark.system, pytest.mark.slow]

MIN_BYTES = 500 * 2**20


def test_vit_b32_checkpoint_uploads_direct_and_reads_back(s3, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    weights = folder / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    del model
    size = weights.stat().st_size
    assert size >= MIN_BYTES, size

    store = ArtifactStore(s3.url(), s3.storage_options)
    started = time.perf_counter()
    hashes = store.put_dir(folder, "models/vit_b32")
    upload_s = time.perf_counter() - started
    objects = store.fs.find(store.path("models/vit_b32"), detail=True)
    assert sorted(path.rsplit("/", 1)[-1] for path in objects) == [COMPLETE_MARKER, weights.name]
    assert objects[store.path(f"models/vit_b32/{weights.name}")]["size"] == size
    assert store.list_temp_objects() == []

    started = time.perf_counter()
    copy = store.get_dir("models/vit_b32", tmp_path / "read_back")
    download_s = time.perf_counter() - started
    assert sha256_file(copy / weights.name) == hashes[weights.name] == sha256_file(weights)
    print(f"ViT-B-32 checkpoint {size / 2**20:.0f} MiB: upload {upload_s:.1f}s ({size / 2**20 / upload_s:.0f} MiB/s), "
          f"download+verify {download_s:.1f}s")
