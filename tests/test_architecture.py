"""docs/architecture.md tells the truth about service/: its modules, and which way imports point."""

import ast
import graphlib
import re
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parent.parent / "service"
ARCHITECTURE = SERVICE.parent / "docs" / "architecture.md"


def imports_of_ours(path: Path) -> set[str]:
    """The service modules `path` imports anywhere: at the top, in functions, under TYPE_CHECKING."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "service":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("service."):
            found.add(node.module.split(".")[1])  # type: ignore[union-attr]
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("service.")}
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    return {path.stem: imports_of_ours(path) for path in sorted(SERVICE.glob("*.py"))}


def test_service_has_no_import_cycle() -> None:
    graph = import_graph()
    assert {"server", "guards", "config"} <= graph.keys()  # the walk found the package
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as cycle:
        pytest.fail(f"import cycle in service/: {' -> '.join(cycle.args[1])}")


def test_the_import_rules_of_the_architecture_hold() -> None:
    graph = import_graph()
    importers = {name: {m for m, deps in graph.items() if name in deps} for name in graph}
    assert importers["servicer"] == {"server"}
    assert importers["server"] == {"__main__"}
    for leaf in ("config", "errors", "models"):
        assert graph[leaf] == set(), f"{leaf} imports {graph[leaf]}"
    assert "watch" not in graph["change_feed"]


def test_every_module_is_named_in_the_architecture_page() -> None:
    named = set(re.findall(r"`([a-z_]+)\.py`", ARCHITECTURE.read_text()))
    modules = {path.stem for path in SERVICE.glob("*.py")} - {"__init__"}
    missing = sorted(modules - named)
    assert not missing, f"docs/architecture.md does not name: {missing}"
    gone = sorted(named - modules)
    assert not gone, f"docs/architecture.md names modules that do not exist: {gone}"
