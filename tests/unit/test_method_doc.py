"""docs/method.md is the method reference the code cites: every cited anchor must exist, and no
docstring may cite the spec files that are not in the repository."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "method.md"
CODE_DIRS = ("clipopt_core", "clipopt_dagster")


def _sources() -> list[Path]:
    return [path for folder in CODE_DIRS for path in sorted((ROOT / folder).rglob("*.py"))]


def test_every_cited_anchor_exists():
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', DOC.read_text()))
    cited = {(path.relative_to(ROOT).as_posix(), anchor) for path in _sources()
             for anchor in re.findall(r"docs/method\.md#([a-z0-9-]+)", path.read_text())}
    assert len(cited) >= 10  # the code does cite the page
    missing = sorted((path, anchor) for path, anchor in cited if anchor not in anchors)
    assert not missing, f"anchors cited but absent from docs/method.md: {missing}"
    internal = set(re.findall(r"\]\(#([a-z0-9-]+)\)", DOC.read_text()))
    assert internal <= anchors, f"broken links inside docs/method.md: {sorted(internal - anchors)}"


def test_no_citation_of_files_outside_the_repo():
    offenders = [path.relative_to(ROOT).as_posix() for path in _sources()
                 if re.search(r"\b(METHOD|DATA)\.md\b", path.read_text())]
    assert not offenders, f"cite docs/method.md instead of METHOD.md/DATA.md in: {offenders}"
