"""Credentials stay out of what Dagster shows and out of the Kubernetes pod a training step starts.

``default_resources`` hands the store ``dg.EnvVar`` references (the UI shows a name, the run reads the
value); the ``pipes_k8s`` pod gets its S3 credentials through ``envFrom: secretRef``, so the pod body
built for a stage request holds no secret value, while a local Pipes child still gets them.
"""
from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from clipopt_core.train.job import StageRequest
from clipopt_dagster.launchers import S3_SECRET, TrainingLauncher
from clipopt_dagster.resources import ArtifactStoreResource

SECRET = "s3cr3t-value-that-must-not-leak"
KEY = "AKIA-test-key-id"
ENDPOINT = "http://10.1.2.3:8333"


def request() -> StageRequest:
    return StageRequest(asset="retrieval_encoder", store_url="s3://bucket/prefix", endpoint_url=ENDPOINT,
                        settings={"epochs": 1}, cache_dir="/cache")


def store() -> ArtifactStoreResource:
    return ArtifactStoreResource(base_url="s3://bucket/prefix", endpoint_url=ENDPOINT, aws_access_key_id=KEY,
                                 aws_secret_access_key=SECRET)


def test_default_resources_reference_credentials_and_endpoint_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipopt_dagster.definitions import default_resources

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("CLIPOPT_S3_ENDPOINT", ENDPOINT)
    resource = default_resources()["store"]
    fields = {"aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
              "endpoint_url": "CLIPOPT_S3_ENDPOINT"}
    for field, variable in fields.items():
        value = getattr(resource, field)
        assert isinstance(value, dg.EnvVar) and value.env_var_name == variable
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert default_resources()["store"].aws_secret_access_key is None  # unset: botocore's own defaults


def pod_body(launcher: TrainingLauncher) -> str:
    """The pod ``PipesK8sClient`` would create for the request, as the JSON sent to the API server."""
    import kubernetes
    from dagster_k8s.pipes import build_pod_body

    env = {**launcher.child_env(request(), store().credentials_env()), "DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msg"}
    pod = build_pod_body("clipopt-train", launcher.image, launcher.command(), env, None, launcher.pod_spec())
    return json.dumps(kubernetes.client.ApiClient().sanitize_for_serialization(pod))


def test_pipes_k8s_pod_takes_credentials_from_the_secret_never_as_values() -> None:
    launcher = TrainingLauncher(mode="pipes_k8s", image="registry.example/clipopt:1", gpus_per_pod=2)
    body = pod_body(launcher)
    assert SECRET not in body and KEY not in body
    container = json.loads(body)["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": S3_SECRET}}]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}  # quantities serialise as strings
    assert json.loads({e["name"]: e["value"] for e in container["env"]}["CLIPOPT_STAGE_REQUEST"])["asset"] == "retrieval_encoder"


def test_secret_names_are_configurable_and_a_local_child_gets_the_values() -> None:
    other = TrainingLauncher(mode="pipes_k8s", image="img", env_secrets=["team-s3", "team-hf"])
    assert json.loads(pod_body(other))["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "team-s3"}}, {"secretRef": {"name": "team-hf"}}]
    local = TrainingLauncher(mode="pipes_subprocess").child_env(request(), store().credentials_env())
    assert (local["AWS_ACCESS_KEY_ID"], local["AWS_SECRET_ACCESS_KEY"]) == (KEY, SECRET)
    assert SECRET not in local["CLIPOPT_STAGE_REQUEST"]


def test_stage_request_json_never_holds_credentials(tmp_path: Path) -> None:
    from clipopt_core.registry import get_stage
    from clipopt_dagster.assets_training import stage_request
    from clipopt_dagster.resources import ComputeResource

    made = stage_request(get_stage("retrieval_encoder"), {"epochs": 1}, store(), ComputeResource(cache_dir=str(tmp_path)))
    assert SECRET not in made.to_json() and KEY not in made.to_json() and ENDPOINT in made.to_json()
