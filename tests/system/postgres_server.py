"""A real PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` in a temp folder on 127.0.0.1, a free port.

As root the server runs as the ``postgres`` user (``runuser``), since initdb refuses root. The binaries
come from ``pg_config --bindir`` or the Debian folder ``/usr/lib/postgresql/<major>/bin`` (not on PATH);
.ci/run installs the ``postgresql`` package when they are missing.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.system.conftest import free_port, wait_for

USER, DATABASE = "dagster", "dagster"


def postgres_bindir() -> Path:
    """The folder with ``initdb`` and ``pg_ctl``; fails (not skips) naming the package when absent."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if shutil.which("pg_config"):
        candidates.insert(0, subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip())
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    pytest.fail("PostgreSQL server binaries not found: apt-get install postgresql (.ci/run does)")


class PostgresServer:
    """One throwaway cluster; ``env()`` gives the DAGSTER_PG_* variables of deploy/dagster.postgres.yaml."""

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="clipopt-pg-"))  # under /tmp: reachable by the postgres user
        self.data, self.port = self.root / "data", free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres")
            self.root.chmod(0o700)

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8",
                  "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "start")
        wait_for(self._create_database, 30, f"PostgreSQL on 127.0.0.1:{self.port}")

    def _create_database(self) -> bool:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cursor.fetchone() is None:
                cursor.execute(f"CREATE DATABASE {DATABASE}")
        connection.close()
        return True

    def version(self) -> int:
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, dbname=DATABASE) as connection:
            return connection.server_version // 10000

    def env(self) -> dict[str, str]:
        return {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USERNAME": USER,
                "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": DATABASE}

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
