"""``clipopt serve`` as a real process on 127.0.0.1, its web page driven in headless Chromium.

Screenshots go to ``test-artifacts/ui/`` (git-ignored), like ``test_ui.py``'s.
"""
from __future__ import annotations

import base64
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from clipopt_core.runtime.storage import ArtifactStore
from tests.serving import publish_all
from tests.system.conftest import ManagedProcess, free_port, wait_for
from tests.system.test_ui import REPO, browser, page, shot  # noqa: F401 - the browser fixtures of the Dagster UI tests

pytestmark = pytest.mark.system
STARTUP_TIMEOUT_S = 120


class Service:
    def __init__(self, base_url: str, store: ArtifactStore, images: Path) -> None:
        self.base_url, self.store, self.images = base_url, store, images


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, shapes_source: Path) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("service")
    store = ArtifactStore(f"file://{root / 'artifacts'}")
    publish_all(store, shapes_source, root)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CLIPOPT_", "AWS_"))}
    env.update(CLIPOPT_CACHE=str(root / "cache"), OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    process = ManagedProcess("clipopt serve", [sys.executable, "-m", "clipopt_core.cli.main", "serve", "--store",
                                               store.base_url, "--port", str(port), "--poll-seconds", "1"],
                             root / "serve.log", env=env, cwd=REPO)
    base_url = f"http://127.0.0.1:{port}"
    process.start()
    try:
        wait_for(lambda: requests.get(f"{base_url}/healthz", timeout=5).ok, STARTUP_TIMEOUT_S,
                 f"clipopt serve on {base_url}/healthz", interval=0.5, alive=process.died)
        yield Service(base_url, store, shapes_source)
    finally:
        process.stop()


def _results_loaded(page) -> int:
    """Number of result images once every one has loaded (a decoded thumbnail, not a broken image), else 0."""
    return page.evaluate("() => { const images = [...document.querySelectorAll('#results img')];"
                         " return images.every(img => img.complete && img.naturalWidth > 0) ? images.length : 0; }")


def test_typing_a_query_shows_result_images(service, page):
    from playwright.sync_api import expect

    page.goto(service.base_url)
    expect(page.locator("#identity")).to_contain_text("model stage1:")
    page.fill("#query", "a red circle")
    page.press("#query", "Enter")
    expect(page.locator("#status")).to_contain_text("20 results from served")
    wait_for(lambda: _results_loaded(page) >= 5, 30, "at least 5 loaded result images")
    scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    shot(page, "service_01_text_query")


def test_dropping_an_image_finds_it_first(service, page):
    from playwright.sync_api import expect

    page.goto(service.base_url)
    dropped = sorted(service.images.rglob("*.png"))[7]
    data = base64.b64encode(dropped.read_bytes()).decode()
    page.evaluate("""(data) => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'query.png', {type: 'image/png'}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
    }""", data)
    expect(page.locator("#status")).to_contain_text("results from served")
    wait_for(lambda: _results_loaded(page) >= 5, 30, "result images of the dropped image")
    label = dropped.parent.name.replace("_", " ")
    expect(page.locator("#results figure").first.locator(".label")).to_have_text(label)
    expect(page.locator("#results figure").first.locator(".score")).to_have_text("1.000")
    shot(page, "service_02_image_drop")


def test_switching_the_variant_answers_from_the_baseline(service, page):
    from playwright.sync_api import expect

    page.goto(service.base_url)
    expect(page.locator("#baseline-radio")).to_be_enabled()
    page.fill("#query", "a blue square")
    page.press("#query", "Enter")
    expect(page.locator("#status")).to_contain_text("results from served (model stage1:")
    served_scores = page.locator("#results .score").all_inner_texts()
    page.check("#baseline-radio")
    expect(page.locator("#status")).to_contain_text("results from baseline (model baseline:")
    wait_for(lambda: _results_loaded(page) >= 5, 30, "baseline result images")
    assert page.locator("#results .score").all_inner_texts() != served_scores
    expect(page.locator("#identity")).to_contain_text("baseline: baseline · model baseline:")
    shot(page, "service_03_baseline_variant")
