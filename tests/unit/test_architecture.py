"""The code's shape: no import cycles, no reaching into another module's private names, the core
free of Dagster, and the launchpad's defaults equal to the core's (one source of defaults)."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("clipopt_core", "clipopt_dagster")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str | None = None) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import in a file, function-level ones included."""
    found: list[tuple[str, str | None]] = []
    name = name or module_name(path)
    package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found += [(base, alias.name) for alias in node.names]
    return found


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def dependency_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for module, imported in imports_of(path):
            target = f"{module}.{imported}" if imported and f"{module}.{imported}" in modules else module
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_there_are_no_import_cycles() -> None:
    assert find_cycle(dependency_graph()) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def private_uses(name: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """Private names of other modules that ``name`` uses: imported (``from m import _x``, ``import pkg._m``
    from outside ``pkg``) or reached as an attribute of an imported project module (``m._x``)."""
    package = name.rsplit(".", 1)[0]
    offences, aliases = [], {}
    for module, imported in imports_of(path, name):
        if not module.startswith(PACKAGES):
            continue
        target = f"{module}.{imported}" if imported else module
        leaf = target.rsplit(".", 1)[-1]
        if leaf.startswith("_") and not leaf.startswith("__") and not (target in modules and target.rsplit(".", 1)[0] == package):
            offences.append(f"{name}: uses {target}")
        if target in modules:
            aliases[target] = target
    tree = ast.parse(path.read_text())
    bound = {alias.asname or alias.name.split(".")[-1]: f"{node.module}.{alias.name}" if isinstance(node, ast.ImportFrom)
             else alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for alias in node.names}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                and not node.attr.startswith("__") and bound.get(node.value.id) in aliases):
            offences.append(f"{name}: uses {bound[node.value.id]}.{node.attr}")
    return offences


def test_no_module_uses_another_modules_private_names() -> None:
    """``_x`` is module-private; package-private modules (timm's ``_helpers``) only from their own package."""
    modules = project_modules()
    assert [o for name, path in modules.items() for o in private_uses(name, path, modules)] == []


def test_the_private_name_check_sees_attribute_access(tmp_path: Path) -> None:
    modules = project_modules()
    source = tmp_path / "m.py"
    source.write_text("from clipopt_core.serve import index as lib\nlib._tune(1)\nfrom clipopt_core.serve.index import _as_f32\n")
    assert private_uses("clipopt_dagster.m", source, modules) == [
        "clipopt_dagster.m: uses clipopt_core.serve.index._as_f32", "clipopt_dagster.m: uses clipopt_core.serve.index._tune"]


def test_the_core_never_imports_dagster() -> None:
    offences = [f"{name}: {module}" for name, path in project_modules().items() if name.startswith("clipopt_core")
                for module, _ in imports_of(path) if module.split(".")[0] in ("dagster", "dagster_pipes", "clipopt_dagster")]
    assert offences == []


@pytest.mark.parametrize("kind", ["retrieval", "mcip", "realign"])
def test_launchpad_defaults_are_the_cores(kind: str) -> None:
    from clipopt_core.train.schema import default_config, stage_config
    from clipopt_dagster.configs import STAGE_SETTINGS

    launchpad = STAGE_SETTINGS[kind]()
    assert launchpad.core() == default_config(kind) == stage_config(kind, {})
    train_fields = {f.name for f in dataclasses.fields(default_config(kind).train)}
    assert train_fields <= set(launchpad.model_dump())  # every optimisation setting is editable


def test_mining_launchpad_defaults_are_the_cores() -> None:
    from clipopt_core.train.config import MiningConfig
    from clipopt_dagster.configs import MiningSettings

    assert MiningSettings().core() == MiningConfig()
