"""The Kubernetes deployment example (deploy/k8s) parses, validates where Dagster can, and matches the code.

The ``[deploy]`` extra (dagster-k8s, dagster-postgres) is installed by scripts/test.sh: the instance
file is checked against Dagster's own instance schema and then each configurable class (the
``K8sRunLauncher``, the Postgres storage) against its own config schema, the run config against the
``k8s_job_executor``'s schema, the Helm values by their keys, and ``definitions_k8s.py`` is loaded with
the real ``dagster_k8s``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import dagster as dg
import yaml
from dagster._core.instance.config import dagster_instance_config

from clipopt_dagster._helpers import GPU_POOL

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def gpu_assets() -> set[str]:
    from clipopt_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    return {key.to_user_string() for key in graph.get_all_asset_keys() if GPU_POOL in graph.get(key).pools}


def test_instance_yaml_is_a_valid_dagster_instance_with_the_k8s_run_launcher() -> None:
    config, _ = dagster_instance_config(str(K8S))  # raises on schema errors
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    assert {"job_namespace", "instance_config_map", "env_config_maps", "env_secrets", "run_k8s_config"} <= set(launcher["config"])
    assert "clipopt-s3" in launcher["config"]["env_secrets"]
    assert "postgres" in config["storage"] and config["concurrency"]["pools"]["default_limit"] >= 1
    assert config["run_monitoring"]["enabled"]


def test_run_config_gives_every_gpu_pool_step_a_gpu() -> None:
    execution = load("run_config.yaml")["execution"]["config"]
    assert {"job_namespace", "step_k8s_config", "per_step_k8s_config", "env_secrets"} <= set(execution)
    per_step = execution["per_step_k8s_config"]
    assert set(per_step) == gpu_assets()  # every step of the pool clipopt_gpu, and only those
    for step in per_step.values():
        assert step["container_config"]["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert step["pod_spec_config"]["volumes"][0]["persistent_volume_claim"]["claim_name"] == "clipopt-work"


def test_helm_values_point_the_code_location_at_the_k8s_definitions() -> None:
    values = load("values.yaml")
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"][-1].endswith("deploy/k8s/definitions_k8s.py")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"


def test_index_shards_jobs_run_the_cli_with_matching_shard_counts() -> None:
    embed, build = yaml.safe_load_all((K8S / "index-shards-job.yaml").read_text())
    assert embed["spec"]["completionMode"] == "Indexed"
    embed_cmd = embed["spec"]["template"]["spec"]["containers"][0]["command"]
    build_cmd = build["spec"]["template"]["spec"]["containers"][0]["command"]
    assert embed_cmd[:3] == ["clipopt", "index-shards", "embed"] and build_cmd[:3] == ["clipopt", "index-shards", "build"]
    shards = int(embed_cmd[embed_cmd.index("--num-shards") + 1])
    assert shards == embed["spec"]["completions"] == int(build_cmd[build_cmd.index("--num-shards") + 1])


def test_k8s_definitions_load_with_the_k8s_job_executor() -> None:
    from dagster_k8s import k8s_job_executor

    spec = importlib.util.spec_from_file_location("definitions_k8s", K8S / "definitions_k8s.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dg.Definitions.validate_loadable(module.defs)
    from clipopt_dagster.definitions import defs as local

    keys = lambda d: {k.to_user_string() for k in d.resolve_asset_graph().get_all_asset_keys()}  # noqa: E731
    assert keys(module.defs) == keys(local) and "faiss_index" in keys(local)
    assert module.defs.executor is k8s_job_executor
