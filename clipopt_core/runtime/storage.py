"""Artifact storage behind one base URL (``file://…`` or ``s3://bucket/prefix``).

Every heavy artifact (checkpoints, embeddings, indexes, reports, pseudo-captions) is
written through :class:`ArtifactStore`. Writes are *publish-safe*, so a reader never sees a
half-written object: on a local filesystem bytes go to a run-unique temporary file first and are
renamed onto the final path when complete; on S3 an object becomes visible only when its single
PUT or its multipart upload completes, so bytes go straight to the final key (no copy + delete,
which would move every checkpoint twice). Multi-file artifacts (a checkpoint folder)
are published file by file and then sealed with a ``_COMPLETE.json`` marker listing the
content hashes; :meth:`ArtifactStore.get_dir` refuses folders without a valid marker.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import polars as pl

COMPLETE_MARKER = "_COMPLETE.json"

try:  # s3fs surfaces unreachable endpoints as botocore errors, which are not OSErrors
    from botocore.exceptions import BotoCoreError as _BotoCoreError

    _TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, _BotoCoreError)
except ImportError:  # pragma: no cover - botocore comes with s3fs
    _TRANSPORT_ERRORS = (OSError, TimeoutError)


class StorageError(RuntimeError):
    """Raised when the artifact store cannot be reached or holds an invalid artifact."""


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a local file, read in ``chunk_bytes`` pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


class ArtifactStore:
    """Keys (``"models/stage1/open_clip_model.safetensors"``) resolved under one base URL.

    Args:
        base_url: ``file:///abs/dir``, a plain local path, or ``s3://bucket/prefix``.
        storage_options: passed to fsspec (for S3: ``key``, ``secret``,
            ``client_kwargs={"endpoint_url": …}``). Never logged.
    """

    def __init__(self, base_url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        options = dict(storage_options or {})
        try:
            self.fs, root = fsspec.core.url_to_fs(self.base_url, **options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open artifact store {self.base_url!r}: {exc}") from exc
        self.root = root.rstrip("/")
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.base_url!r})"

    # -- addressing -------------------------------------------------------
    def path(self, key: str) -> str:
        """Filesystem path (no protocol) of ``key``."""
        return f"{self.root}/{key.lstrip('/')}"

    def url(self, key: str) -> str:
        """Full URL of ``key``, the form shown to users and stored in metadata."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        protocol = "file" if self.is_local else protocols[0]
        return f"{protocol}://{self.path(key)}"

    # -- single objects ---------------------------------------------------
    def exists(self, key: str) -> bool:
        return self._call("check", key, lambda: self.fs.exists(self.path(key)))

    def read_bytes(self, key: str) -> bytes:
        return self._call("read", key, lambda: self.fs.cat_file(self.path(key)))

    def write_bytes(self, key: str, data: bytes) -> str:
        """Publish ``data`` at ``key`` atomically; returns its SHA-256."""
        self._publish_atomically("write", key, lambda temp: self.fs.pipe_file(temp, data))
        return sha256_bytes(data)

    def put_file(self, local: Path, key: str) -> str:
        """Upload a local file to ``key`` atomically; returns its SHA-256."""
        self._publish_atomically("upload", key, lambda temp: self.fs.put_file(str(local), temp))
        return sha256_file(local)

    def write_json(self, key: str, payload: Any) -> str:
        return self.write_bytes(key, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_parquet(self, key: str, frame: pl.DataFrame) -> str:
        buffer = io.BytesIO()
        frame.write_parquet(buffer)
        return self.write_bytes(key, buffer.getvalue())

    def read_parquet(self, key: str) -> pl.DataFrame:
        return pl.read_parquet(io.BytesIO(self.read_bytes(key)))

    # -- folders ----------------------------------------------------------
    def put_dir(self, local_dir: Path, key: str) -> dict[str, str]:
        """Publish every file of ``local_dir`` under ``key/`` and seal it with a marker.

        Returns ``{relative_path: sha256}``. An earlier marker is removed first so a
        reader never pairs an old marker with half-replaced files.
        """
        marker = f"{key}/{COMPLETE_MARKER}"
        if self.exists(marker):
            self._call("unseal", marker, lambda: self.fs.rm_file(self.path(marker)))
        hashes = {
            file.relative_to(local_dir).as_posix(): self.put_file(file, f"{key}/{file.relative_to(local_dir).as_posix()}")
            for file in sorted(local_dir.rglob("*"))
            if file.is_file()
        }
        self.write_json(marker, {"files": hashes})
        return hashes

    def get_file(self, key: str, local: Path) -> Path:
        """Download one object to ``local`` (streamed to disk, never held in memory; temp name + rename)."""
        staging = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex}")
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._call("download", key, lambda: self.fs.get_file(self.path(key), str(staging)))
            os.replace(staging, local)
        finally:
            staging.unlink(missing_ok=True)
        return local

    def get_dir(self, key: str, local_dir: Path) -> Path:
        """Download a sealed folder to ``local_dir`` (skipped when already there, same hashes)."""
        marker = f"{key}/{COMPLETE_MARKER}"
        if not self.exists(marker):
            raise StorageError(f"{self.url(key)} is not a complete artifact (no {COMPLETE_MARKER}); re-materialise it")
        files: dict[str, str] = self.read_json(marker)["files"]
        local_marker = local_dir / COMPLETE_MARKER
        if local_marker.exists() and json.loads(local_marker.read_text())["files"] == files:
            return local_dir
        staging = local_dir.with_name(f"{local_dir.name}.tmp-{uuid.uuid4().hex}")
        staging.mkdir(parents=True)
        for relative, expected in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            self._call("download", f"{key}/{relative}", lambda: self.fs.get_file(self.path(f"{key}/{relative}"), str(target)))
            if sha256_file(target) != expected:
                shutil.rmtree(staging)
                raise StorageError(f"{self.url(key)}/{relative}: content hash differs from its marker; re-materialise it")
        (staging / COMPLETE_MARKER).write_text(json.dumps({"files": files}))
        if local_dir.exists():
            shutil.rmtree(local_dir)
        os.replace(staging, local_dir)
        return local_dir

    def list_keys(self, prefix: str) -> list[str]:
        """Keys of every object under ``prefix/`` (sorted; empty when there is none)."""
        def _list() -> list[str]:
            base = self.path(prefix)
            if not self.fs.exists(base):
                return []
            return sorted(path.removeprefix(f"{self.root}/") for path in self.fs.find(base))
        return self._call("list", prefix, _list)

    def copy(self, source: str, target: str) -> None:
        """Publish a copy of key ``source`` at key ``target`` (S3: one server-side copy; local: temp + rename)."""
        self._publish_atomically("copy", target, lambda path: self.fs.copy(self.path(source), path))

    def list_temp_objects(self, prefix: str = "") -> list[str]:
        """Leftover ``*.tmp-*`` objects under ``prefix`` (empty unless a local write was killed, or an
        S3 upload of a release that still staged S3 writes under temp keys)."""
        def _list() -> list[str]:
            base = self.path(prefix) if prefix else self.root
            if not self.fs.exists(base):
                return []
            return [path for path in self.fs.find(base) if ".tmp-" in path.rsplit("/", 1)[-1]]
        return self._call("list", prefix, _list)

    def remove_stale_temp_objects(self, older_than_s: float = 3600.0, prefix: str = "") -> list[str]:
        """Delete ``*.tmp-*`` objects older than ``older_than_s`` (left by killed uploads); returns them.

        Readers never see temp objects, so this only reclaims space. The age bound keeps the
        temp objects of uploads still in flight in a concurrent run.
        """
        now = time.time()
        stale = [path for path in self.list_temp_objects(prefix) if now - self._modified(path) > older_than_s]
        for path in stale:
            self._call("delete", path, lambda path=path: self.fs.rm_file(path))
        return stale

    def _modified(self, path: str) -> float:
        """Modification time of ``path`` in seconds since the epoch (local mtime or S3 LastModified)."""
        info = self._call("stat", path, lambda: self.fs.info(path))
        stamp = info.get("mtime", info.get("LastModified", info.get("created", 0)))
        return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)

    # -- internals --------------------------------------------------------
    def _publish_atomically(self, action: str, key: str, write: Any) -> None:
        """Run ``write(path)`` so that ``key`` appears whole or not at all.

        Local: on a run-unique temp file, then ``os.replace`` onto the final path. S3: on the final key
        itself (a PUT or a multipart completion is atomic; a killed multipart upload leaves no object).
        """
        final = self.path(key)

        def _write_and_publish() -> None:
            if not self.is_local:
                write(final)
                self.fs.invalidate_cache()
                return
            os.makedirs(os.path.dirname(final), exist_ok=True)
            temp = f"{final}.tmp-{uuid.uuid4().hex}"
            write(temp)
            os.replace(temp, final)

        self._call(action, key, _write_and_publish)

    def _call(self, action: str, key: str, operation: Any) -> Any:
        try:
            return operation()
        except FileNotFoundError as exc:
            raise StorageError(f"{action} {self.url(key)}: not found") from exc
        except _TRANSPORT_ERRORS as exc:
            raise StorageError(
                f"{action} {self.url(key)} failed: {type(exc).__name__}: {exc}. "
                "Check that the artifact store is reachable and the credentials are right."
            ) from exc


def configure_s3_defaults(endpoint_url: str | None = None, key: str | None = None, secret: str | None = None) -> None:
    """Make every ``s3://`` URL opened through fsspec in this process use this endpoint/credentials.

    Image sources and image URIs (read by decoding, training and embedding code far from any
    resource) go through plain ``fsspec.open``; this sets fsspec's per-protocol defaults so
    they reach S3-compatible servers too. Values left ``None`` keep botocore's defaults
    (environment, ~/.aws). Explicit ``storage_options`` (the artifact store's) still win.
    """
    defaults: dict[str, Any] = fsspec.config.conf.setdefault("s3", {})
    if endpoint_url:
        defaults.setdefault("client_kwargs", {})["endpoint_url"] = endpoint_url
    if key and secret:
        defaults.update(key=key, secret=secret)
    fsspec.config.conf["s3"] = defaults
