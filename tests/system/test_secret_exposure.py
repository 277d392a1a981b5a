"""The S3 secret never reaches what Dagster shows or records: GraphQL, run config, event log, output.

The code location is loaded the way the webserver loads it (``workspace.yaml``, a gRPC code server
started with the secret in its environment) and asked over GraphQL for the store's configured values
and the launchpad's default run config. A whole tiny run on the real S3 server (SeaweedFS) with the
credentials from the environment then must not log the secret anywhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from tests.pipeline.conftest import tiny_resources, tiny_run_config
from tests.system.conftest import S3Server

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
RESOURCE = """query ($selector: ResourceSelector!) { topLevelResourceDetailsOrError(resourceSelector: $selector) {
  __typename ... on ResourceDetails { configuredValues { key value type } } } }"""
DEFAULT_RUN_CONFIG = """query ($selector: PipelineSelector!) { runConfigSchemaOrError(selector: $selector) {
  __typename ... on RunConfigSchema { rootDefaultYaml } } }"""


def with_s3_env(monkeypatch: pytest.MonkeyPatch, s3: S3Server) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    monkeypatch.setenv("CLIPOPT_S3_ENDPOINT", s3.endpoint_url)


def test_graphql_shows_variable_names_never_the_secret(s3, monkeypatch, tmp_path):
    from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

    with_s3_env(monkeypatch, s3)
    monkeypatch.setenv("CLIPOPT_ARTIFACTS", s3.url("graphql"))
    monkeypatch.chdir(ROOT)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        with define_out_of_process_context(str(ROOT / "workspace.yaml"), None, instance) as context:
            location = {"repositoryLocationName": "clipopt", "repositoryName": "__repository__"}
            details = execute_dagster_graphql(context, RESOURCE, {"selector": {**location, "resourceName": "store"}})
            values = {v["key"]: v for v in details.data["topLevelResourceDetailsOrError"]["configuredValues"]}
            schema = execute_dagster_graphql(context, DEFAULT_RUN_CONFIG,
                                             {"selector": {**location, "pipelineName": "retraining_job"}})
    assert values["aws_secret_access_key"]["type"] == "ENV_VAR"
    assert values["aws_secret_access_key"]["value"] == "AWS_SECRET_ACCESS_KEY"
    assert values["endpoint_url"]["value"] == "CLIPOPT_S3_ENDPOINT"
    default_yaml = schema.data["runConfigSchemaOrError"]["rootDefaultYaml"]
    assert "faiss_index" in default_yaml
    shown = json.dumps(details.data) + default_yaml
    assert s3.secret not in shown and s3.key not in shown and s3.endpoint_url not in shown


def test_a_whole_run_on_s3_never_logs_the_secret(s3, monkeypatch, tmp_path, shapes_source, caption_source, capfd):
    from clipopt_dagster.definitions import ASSET_CHECKS, ASSETS, default_resources
    from clipopt_dagster.partitions import ALL_SHARDS_TAGS

    with_s3_env(monkeypatch, s3)
    url = s3.url("secrets-" + tmp_path.name[-20:])
    monkeypatch.setenv("CLIPOPT_ARTIFACTS", url)
    resources = {**tiny_resources(tmp_path, shapes_source, caption_source), "store": default_resources()["store"]}
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        result = dg.materialize([*ASSETS, *ASSET_CHECKS], resources=resources, run_config=tiny_run_config(),
                                tags=ALL_SHARDS_TAGS, instance=instance)
        assert result.success
        records = instance.all_logs(result.run_id)
        run = instance.get_run_by_id(result.run_id)
    index_uri = result.asset_materializations_for_node("faiss_index")[0].metadata["uri"].value
    assert index_uri.startswith(url)  # the run really used the S3 store it read from the environment
    logged = "\n".join(dg.serialize_value(record) for record in records)  # messages, metadata, step data
    output = capfd.readouterr()
    assert len(records) > 50 and "faiss_index" in logged
    for text in (logged, output.out, output.err, json.dumps(run.run_config, default=str), json.dumps(run.tags)):
        assert s3.secret not in text
