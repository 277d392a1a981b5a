"""``dagster dev`` on 127.0.0.1 with a temporary instance: GraphQL launches and the web UI in Chromium.

Screenshots go to ``test-artifacts/ui/`` under the repository root (git-ignored).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import requests

from tests.conftest import write_caption_source, write_shapes_source
from tests.pipeline.conftest import retraining_run_config
from tests.system.conftest import VENV_BIN, ManagedProcess, free_port, wait_for

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SMALL_SELECTION = ["raw_images", "image_manifest", "image_splits"]
SMALL_RUN_CONFIG = {"ops": {"image_splits": {"config": {"val_fraction": 0.25, "test_fraction": 0.3, "seed": 0}}}}
STARTUP_TIMEOUT_S = 120
SMALL_RUN_TIMEOUT_S = 120
FULL_RUN_TIMEOUT_S = 300
BACKFILL_TIMEOUT_S = 300
UI_TIMEOUT_MS = 30_000

LAUNCH_RUN = """
mutation LaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
    ... on PythonError { message stack }
    ... on UnauthorizedError { message }
  }
}
"""
LAUNCH_BACKFILL = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message stack }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
  }
}
"""
BACKFILL = """
query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status runs(limit: 50) { runId status tags { key value } } }
    ... on PythonError { message }
  }
}
"""
RUN_STATUS = "query RunStatus($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { status } } }"
RUN_DETAILS = """
query RunDetails($runId: ID!) {
  runOrError(runId: $runId) {
    ... on Run {
      status
      assetMaterializations { assetKey { path } }
      eventConnection(limit: 1000) {
        events { __typename ... on MessageEvent { message } ... on ExecutionStepFailureEvent { error { message } } }
      }
    }
  }
}
"""
RECENT_RUNS = "{ runsOrError(limit: 50) { __typename ... on Runs { results { runId status } } } }"
LOCATIONS = """
{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name location { name } pipelines { name } } }
                        ... on PythonError { message } } }
"""


class DagsterDev:
    """A running ``dagster dev`` and a small GraphQL client for it."""

    def __init__(self, base_url: str, process: ManagedProcess, artifacts: Path) -> None:
        self.base_url, self.process, self.artifacts = base_url, process, artifacts
        self.location = self.repository = ""

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = requests.post(f"{self.base_url}/graphql", json={"query": query, "variables": variables or {}},
                                 timeout=30)
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body["errors"]
        return body["data"]

    def launch(self, selection: list[str] | None, run_config: dict, partition: str | None = None) -> str:
        """``launchRun`` of the implicit asset job with ``selection`` (of one ``partition``), or (``None``) of
        ``retraining_job``: every asset, every gallery shard."""
        selector: dict[str, Any] = {"repositoryLocationName": self.location, "repositoryName": self.repository,
                                    "jobName": "retraining_job" if selection is None else "__ASSET_JOB"}
        if selection is not None:
            selector["assetSelection"] = [{"path": [name]} for name in selection]
        params: dict[str, Any] = {"selector": selector, "runConfigData": run_config}
        if partition is not None:
            params["executionMetadata"] = {"tags": [{"key": "dagster/partition", "value": partition}]}
        result = self.graphql(LAUNCH_RUN, {"executionParams": params})
        launched = result["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        return launched["run"]["runId"]

    def status(self, run_id: str) -> str:
        return self.graphql(RUN_STATUS, {"runId": run_id})["runOrError"]["status"]

    def wait_for_run(self, run_id: str, timeout: float) -> dict[str, Any]:
        """Poll until the run ends; fail with its error messages unless it succeeded."""
        final = wait_for(lambda: self.status(run_id) in ("SUCCESS", "FAILURE", "CANCELED"), timeout,
                         f"run {run_id} to finish", interval=1.0, alive=self.process.died)
        assert final
        details = self.graphql(RUN_DETAILS, {"runId": run_id})["runOrError"]
        if details["status"] != "SUCCESS":
            messages = [event.get("error", {}).get("message") or event.get("message", "")
                        for event in details["eventConnection"]["events"]
                        if "Failure" in event["__typename"] or "Error" in event["__typename"]]
            pytest.fail(f"run {run_id} ended {details['status']}: {messages[-5:]}\n{self.process.log_tail(2000)}")
        return details

    def run_id_starting_with(self, short_id: str) -> str:
        runs = self.graphql(RECENT_RUNS)["runsOrError"]["results"]
        matches = [run["runId"] for run in runs if run["runId"].startswith(short_id)]
        assert len(matches) == 1, (short_id, runs)
        return matches[0]

    @staticmethod
    def materialised(details: dict[str, Any]) -> set[str]:
        return {"/".join(event["assetKey"]["path"]) for event in details["assetMaterializations"]}


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterDev]:
    root = tmp_path_factory.mktemp("dagster_dev")
    home = root / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    images = write_shapes_source(root / "shapes")
    captions = write_caption_source(root / "captions")
    artifacts = root / "artifacts"
    port = free_port()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("CLIPOPT_", "DAGSTER_", "AWS_"))}
    env.update(DAGSTER_HOME=str(home), CLIPOPT_IMAGES=str(images), CLIPOPT_CAPTIONS=str(captions),
               CLIPOPT_ARTIFACTS=f"file://{artifacts}", CLIPOPT_CACHE=str(root / "cache"),
               OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    process = ManagedProcess(
        "dagster dev", [str(VENV_BIN / "dagster"), "dev", "-m", "clipopt_dagster.definitions", "-h", "127.0.0.1",
                        "-p", str(port)], root / "dagster-dev.log", env=env, cwd=root)
    server = DagsterDev(f"http://127.0.0.1:{port}", process, artifacts)
    process.start()
    try:
        wait_for(lambda: requests.get(f"{server.base_url}/server_info", timeout=5).ok, STARTUP_TIMEOUT_S,
                 f"dagster dev on {server.base_url}/server_info", interval=0.5, alive=process.died)

        def _location_loaded() -> bool:
            repositories = server.graphql(LOCATIONS)["repositoriesOrError"]
            assert repositories["__typename"] == "RepositoryConnection", repositories
            nodes = repositories["nodes"]
            if nodes:
                server.repository, server.location = nodes[0]["name"], nodes[0]["location"]["name"]
            return bool(nodes)

        wait_for(_location_loaded, STARTUP_TIMEOUT_S, "the code location to load", interval=0.5, alive=process.died)
        server.graphql("mutation { setNuxSeen }")  # no "join the community" dialog over the pages
        yield server
    finally:
        process.stop(timeout=20)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()


@pytest.fixture
def page(browser):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)  # assertions have their own 5 s default, too short on a loaded CI box
    try:
        yield context.new_page()
    finally:
        context.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), animations="disabled")


def test_graphql_launches_a_small_selection(dagster_dev):
    assert dagster_dev.location == "clipopt_dagster.definitions"
    jobs = dagster_dev.graphql(LOCATIONS)["repositoriesOrError"]["nodes"][0]["pipelines"]
    assert {"__ASSET_JOB", "retraining_job"} <= {job["name"] for job in jobs}

    run_id = dagster_dev.launch(SMALL_SELECTION, SMALL_RUN_CONFIG)
    details = dagster_dev.wait_for_run(run_id, SMALL_RUN_TIMEOUT_S)
    assert dagster_dev.materialised(details) == set(SMALL_SELECTION)
    splits = pl.read_parquet(dagster_dev.artifacts / "data" / "splits.parquet")
    assert set(splits["split"].unique()) == {"train", "val", "test"}
    assert not list(dagster_dev.artifacts.rglob("*.tmp-*"))


def test_ui_asset_graph_and_materialise_from_the_asset_page(dagster_dev, page):
    from playwright.sync_api import expect

    # the asset graph of one group shows its assets and the neighbours in other groups
    page.goto(f"{dagster_dev.base_url}/locations/{dagster_dev.location}/asset-groups/training")
    for name in ("retrieval_encoder", "mcip_encoder", "realigned_mcip", "evaluation_report"):
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    expect(page.get_by_text("Loading...")).to_have_count(0)  # the nodes' status rows have loaded
    shot(page, "01_asset_graph_training")

    page.goto(f"{dagster_dev.base_url}/assets")
    for name in ("raw_images", "retrieval_encoder", "evaluation_report", "faiss_index"):
        expect(page.locator(f'a[href="/assets/{name}"]').first).to_contain_text(name)
    expect(page.get_by_text("Loading...")).to_have_count(0)
    shot(page, "02_asset_catalog")

    page.goto(f"{dagster_dev.base_url}/assets/raw_images")
    button = page.locator("button").filter(has_text=re.compile(r"^Materialize$"))
    expect(button).to_be_enabled()
    button.click()
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    expect(toast).to_be_visible()
    short_id = re.search(r"[0-9a-f]{8}", toast.inner_text()).group(0)
    shot(page, "03_materialize_launched")
    run_id = dagster_dev.run_id_starting_with(short_id)
    page.goto(f"{dagster_dev.base_url}/runs/{run_id}")
    expect(page.get_by_text(short_id, exact=True).first).to_be_visible()
    expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=SMALL_RUN_TIMEOUT_S * 1000)
    shot(page, "04_run_success")
    details = dagster_dev.wait_for_run(run_id, 10)
    assert dagster_dev.materialised(details) == {"raw_images"}


def test_ui_shows_the_evaluation_report_after_the_full_graph(dagster_dev, page):
    from playwright.sync_api import expect

    started = time.monotonic()
    run_id = dagster_dev.launch(None, retraining_run_config())
    details = dagster_dev.wait_for_run(run_id, FULL_RUN_TIMEOUT_S)
    assert {"evaluation_report", "faiss_index", "realigned_mcip"} <= dagster_dev.materialised(details)
    print(f"full graph through dagster dev: {time.monotonic() - started:.1f}s")

    page.goto(f"{dagster_dev.base_url}/assets/evaluation_report")
    report_row = page.locator("tr").filter(has=page.get_by_text("report", exact=True))
    expect(report_row.first).to_be_visible()
    report_row.first.get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    tables = dialog.locator("table")  # results, change vs baseline, every column
    expect(tables.first).to_be_visible()
    assert tables.count() == 3
    expect(tables.first.get_by_text("T2I R@5", exact=True)).to_be_visible()  # the paper's headline columns
    table = tables.last
    for cell in ("variant", "baseline", "mcip_realign", "i2i_map", "t2i_r5"):
        expect(table.get_by_text(cell, exact=True).first).to_be_visible()
    assert table.locator("tr").count() == 6  # header + five variants
    shot(page, "05_evaluation_report_markdown")
    dialog.get_by_role("button", name="Close").click()
    expect(page.get_by_text("report_uri", exact=True)).to_be_visible()
    shot(page, "06_evaluation_report_page")


def test_ui_shows_table1_for_the_benchmarks_present(dagster_dev, page, tmp_path):
    """After the full graph: two Table 1 columns from miniature official layouts, one without a root (skipped,
    not failed), then ``table1_report``, whose markdown table the asset page shows."""
    from playwright.sync_api import expect

    from tests.unit.test_benchmark_suite_loaders import cub_layout, gpr1200_layout

    roots = {"gpr1200": str(gpr1200_layout(tmp_path / "gpr1200")), "cub200": str(cub_layout(tmp_path / "cub"))}
    suite = {"ops": {"benchmark_suite": {"config": {"roots": roots, "templates": "short"}}}}
    for column in ("i2i_gpr1200", "i2i_cub200", "i2i_instre"):
        dagster_dev.wait_for_run(dagster_dev.launch(["benchmark_suite"], suite, partition=column), SMALL_RUN_TIMEOUT_S)
    dagster_dev.wait_for_run(dagster_dev.launch(["table1_report"], {}), SMALL_RUN_TIMEOUT_S)

    page.goto(f"{dagster_dev.base_url}/assets/table1_report")
    row = page.locator("tr").filter(has=page.get_by_text("table1", exact=True)).first
    row.get_by_text("[Show Markdown]").click()  # markdown of 1000 characters or more opens in a dialog
    dialog = page.get_by_role("dialog")
    table = dialog.locator("table").first
    expect(table).to_be_visible()
    for cell in ("I2I GPR1200", "I2I CUB200", "AVG (2/14)", "baseline", "mcip_realign", "mcip_realign · vs baseline"):
        expect(table.get_by_text(cell).first).to_be_visible()
    # header + five variants + four differences to the baseline (the tiny base model is not one of the paper's)
    assert table.locator("tr").count() == 10
    expect(table.locator("tr").nth(1).locator("td").first).to_have_text("baseline")  # pipeline order, not sorted
    expect(table.get_by_text(re.compile(r"^[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]\*?$")).first).to_be_visible()
    expect(dialog.get_by_text(re.compile(r"i2i_instre: .*roots\.instre")).first).to_be_visible()
    shot(page, "07_table1_report")


def test_backfill_fans_the_gallery_shards_out_one_run_each(dagster_dev):
    """After the full graph: a backfill of every shard is one run per shard through the daemon; the shard
    whose files were removed is embedded again, the others are already current and skipped."""
    from clipopt_dagster.partitions import shard_keys

    embeddings = dagster_dev.artifacts / "serving" / "embeddings"
    removed = embeddings / "shard-00001-of-00004.json"
    assert removed.exists(), "the full-graph test publishes every shard first"
    removed.unlink()
    result = dagster_dev.graphql(LAUNCH_BACKFILL, {"params": {
        "assetSelection": [{"path": ["gallery_embeddings"]}], "allPartitions": True, "title": "reshard gallery"}})
    launched = result["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched

    def backfill() -> dict[str, Any]:
        return dagster_dev.graphql(BACKFILL, {"id": launched["backfillId"]})["partitionBackfillOrError"]

    wait_for(lambda: backfill()["status"] not in ("REQUESTED", "CANCELING", "FAILING"), BACKFILL_TIMEOUT_S,
             "the gallery backfill to finish", interval=2.0, alive=dagster_dev.process.died)
    final = backfill()
    partitions = sorted(_single_partition({tag["key"]: tag["value"] for tag in run["tags"]}) for run in final["runs"])
    assert final["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), final
    assert partitions == shard_keys(4) and {run["status"] for run in final["runs"]} == {"SUCCESS"}, final
    assert removed.exists() and len(list(embeddings.glob("shard-*-of-00004.parquet"))) == 4


def _single_partition(tags: dict[str, str]) -> str | None:
    """The one partition a run targets: ``dagster/partition``, or a range whose start is its end."""
    start, end = tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")
    return tags.get("dagster/partition") or (start if start == end else None)
