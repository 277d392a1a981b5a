"""The clipopt code location for Kubernetes: the same assets and resources, one pod per step.

Load it instead of ``clipopt_dagster.definitions`` in the code-location image (values.yaml:
``dagsterApiGrpcArgs: ["--python-file", "deploy/k8s/definitions_k8s.py"]``, relative to the image WORKDIR). It needs
the ``[deploy]`` extra (dagster-k8s). Asset code does not change; only the executor does. Resources come from the
environment as in the local location (CLIPOPT_ARTIFACTS=s3://…, CLIPOPT_DEVICE=cuda, and
CLIPOPT_LAUNCHER=pipes_subprocess + CLIPOPT_NPROC_PER_NODE=N for torchrun inside the step pod, or
CLIPOPT_LAUNCHER=pipes_k8s + CLIPOPT_TRAIN_IMAGE for a separate GPU pod started by ``PipesK8sClient``).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dagster as dg
from dagster_k8s import k8s_job_executor

from clipopt_dagster import definitions as local

defs = dg.Definitions(
    assets=[*local.ASSETS, *local.SUITE_ASSETS],
    asset_checks=local.ASSET_CHECKS,
    jobs=[local.retraining_job],
    schedules=[local.retraining_schedule],
    sensors=[local.new_images_sensor],
    resources=local.default_resources(),
    executor=k8s_job_executor,  # sized by deploy/k8s/run_config.yaml (execution.config)
)
