"""The ``[deploy]`` extra installs from requirements.lock, and what deploy/ names exists and accepts its config.

The dry run resolves ``.[deploy]`` with the lock as constraints in a fresh virtual environment (no
packages of the test environment leak in); the other tests import the integration classes and run
Dagster's own config validation of each configurable class named by ``deploy/k8s/dagster.yaml`` and
``deploy/dagster.postgres.yaml`` against those files.
"""
from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.instance.config import dagster_instance_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_PACKAGES = {"dagster-k8s", "dagster-postgres", "dagster-aws"}
PG_ENV = {"DAGSTER_PG_HOST": "db.example", "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "pw",
          "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_PORT": "5432"}


def lock() -> dict[str, str]:
    pins = (line.split("==") for line in (ROOT / "requirements.lock").read_text().split())
    return {name.lower().replace("_", "-"): version for name, version in pins}


@pytest.mark.slow  # a fresh venv and a pip resolution: 1-3 min
def test_deploy_extra_resolves_from_the_lock_in_a_clean_venv(tmp_path: Path) -> None:
    venv.create(tmp_path / "venv", with_pip=True)
    report = tmp_path / "report.json"
    done = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--quiet",
                           "--report", str(report), "-c", str(ROOT / "requirements.lock"), f"{ROOT}[deploy]"],
                          capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    pins = lock()
    assert DEPLOY_PACKAGES <= set(chosen)
    assert {name for name in chosen if name != "clipopt"} <= set(pins), "the lock must pin every package of the extra"
    assert {name: version for name, version in chosen.items() if name != "clipopt" and pins[name] != version} == {}
    assert chosen["dagster"] == pins["dagster"] == pins["dagster-dg-cli"] == pins["dagster-webserver"]


def test_integration_classes_import() -> None:
    from dagster_aws.s3 import S3Resource  # noqa: F401
    from dagster_k8s import K8sRunLauncher, PipesK8sClient, k8s_job_executor  # noqa: F401
    from dagster_postgres import (DagsterPostgresStorage, PostgresEventLogStorage,  # noqa: F401
                                  PostgresRunStorage, PostgresScheduleStorage)


def validate_class(module: str, klass: str, config: dict) -> None:
    """Dagster's own validation of ``config`` for the configurable class ``module.klass``."""
    import importlib

    cls = getattr(importlib.import_module(module), klass)
    result = process_config(resolve_to_config_type(cls.config_type()), config)
    assert result.success, [error.message for error in result.errors]


@pytest.mark.parametrize("folder, file", [("deploy/k8s", "dagster.yaml"), ("deploy", "dagster.postgres.yaml")])
def test_instance_profiles_validate_against_their_classes(folder: str, file: str, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "dagster.yaml").write_text((ROOT / folder / file).read_text())
    config, _ = dagster_instance_config(str(tmp_path))  # the instance schema
    storage = config["storage"]["postgres"]
    validate_class("dagster_postgres", "DagsterPostgresStorage", storage)
    if "run_launcher" in config:
        launcher = config["run_launcher"]
        validate_class(launcher["module"], launcher["class"], launcher["config"])
    assert config["run_monitoring"]["enabled"] and config["concurrency"]["pools"]["default_limit"] >= 1


def test_k8s_run_config_validates_against_the_k8s_job_executor() -> None:
    from dagster_k8s import k8s_job_executor

    execution = yaml.safe_load((ROOT / "deploy" / "k8s" / "run_config.yaml").read_text())["execution"]["config"]
    schema = k8s_job_executor.config_schema
    result = process_config(resolve_to_config_type(schema.config_type if hasattr(schema, "config_type") else schema),
                            execution)
    assert result.success, [error.message for error in result.errors]


def test_a_broken_launcher_config_is_refused() -> None:
    """The validation above can fail: a misspelt key of the run launcher is an error."""
    config = yaml.safe_load((ROOT / "deploy" / "k8s" / "dagster.yaml").read_text())["run_launcher"]["config"]
    config["job_namspace"] = config.pop("job_namespace")
    with pytest.raises(AssertionError):
        validate_class("dagster_k8s", "K8sRunLauncher", config)




def test_every_shipped_instance_profile_enables_run_monitoring(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    profiles = [ROOT / "dagster.yaml", ROOT / "deploy" / "dagster.postgres.yaml", ROOT / "deploy" / "k8s" / "dagster.yaml"]
    for profile in profiles:
        folder = tmp_path / profile.parent.name
        folder.mkdir(exist_ok=True)
        (folder / "dagster.yaml").write_text(profile.read_text())
        config, _ = dagster_instance_config(str(folder))
        assert config["run_monitoring"]["enabled"], profile
        assert config["concurrency"]["pools"]["default_limit"] >= 1, profile
