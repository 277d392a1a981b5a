"""The Dagster code location: assets, checks, jobs, schedules, sensors and resources."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dagster as dg

from clipopt_core.runtime.storage import configure_s3_defaults
from clipopt_dagster import (assets_data, assets_release, assets_search, assets_serving, assets_suite, assets_sweep,
                             assets_training, checks)
from clipopt_dagster.automation import new_images_sensor, retraining_job, retraining_schedule, seed_sweep_job
from clipopt_dagster.launchers import launcher_from_env
from clipopt_dagster.resources import ArtifactStoreResource, CatalogResource, ComputeResource, DataSourceResource
from clipopt_dagster.run_claims import releasing_in_process_executor


def env_var(name: str) -> dg.EnvVar | None:
    """``dg.EnvVar(name)`` when ``name`` is set, else ``None``.

    An ``EnvVar`` is read when the resource is built in the run, so the UI, GraphQL and the run's
    config show the variable's name, never its value (a plain ``os.environ`` value would become the
    resource's visible config default).
    """
    return dg.EnvVar(name) if os.environ.get(name) else None


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """Resources from the environment: CLIPOPT_ARTIFACTS (file:// or s3://), CLIPOPT_S3_ENDPOINT, CLIPOPT_DEVICE,
    CLIPOPT_LAUNCHER (in_process default, pipes_subprocess, pipes_k8s) + CLIPOPT_NPROC_PER_NODE …

    Credentials and endpoints go in as :func:`env_var` references.
    """
    store = ArtifactStoreResource(endpoint_url=env_var("CLIPOPT_S3_ENDPOINT"),
                                  aws_access_key_id=env_var("AWS_ACCESS_KEY_ID"),
                                  aws_secret_access_key=env_var("AWS_SECRET_ACCESS_KEY"))
    sources = DataSourceResource(images=os.environ.get("CLIPOPT_IMAGES", "demo"),
                                 captions=os.environ.get("CLIPOPT_CAPTIONS", "demo") or None)
    compute = ComputeResource(device=os.environ.get("CLIPOPT_DEVICE", "cpu"), launcher=launcher_from_env())
    return {"store": store, "compute": compute,
            "sources": sources, "catalog": CatalogResource()}


# Image sources and image URIs on an S3-compatible server (every executor process loads this module).
configure_s3_defaults(os.environ.get("CLIPOPT_S3_ENDPOINT"))

ASSETS = dg.load_assets_from_modules([assets_data, assets_training, assets_serving, assets_release, assets_search,
                                      assets_sweep])
# The benchmark suite apart: partitioned by Table 1 column, run on request with its own roots; ASSETS stays
# the graph one run materialises whole (tests and ``retraining_job``).
SUITE_ASSETS = [assets_suite.benchmark_suite, assets_suite.table1_report]
ASSET_CHECKS = dg.load_asset_checks_from_modules([checks])

defs = dg.Definitions(
    assets=[*ASSETS, *SUITE_ASSETS],
    asset_checks=ASSET_CHECKS,
    jobs=[retraining_job, seed_sweep_job],
    schedules=[retraining_schedule],
    sensors=[new_images_sensor],
    resources=default_resources(),
    executor=releasing_in_process_executor,  # dg.in_process_executor + freeing slots of killed runs
)
