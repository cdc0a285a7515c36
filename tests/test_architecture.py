"""docs/architecture.md against the real imports: every module in one layer, imports only
sideways or down, no cycles, and the producer library never imports the service."""

from __future__ import annotations

import ast
import graphlib
import re
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.unit  # no redis-server: the unit tier (make test-unit)

SERVICE = ROOT / "bales_stream"
PRODUCER = ROOT / "producers" / "bales_producer"


def documented_layers() -> dict[str, int]:
    """module -> layer number, from the table of docs/architecture.md."""
    layers: dict[str, int] = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        row = re.match(r"\| (\d+) \w+ \| (.+?) \|", line)
        if row:
            for module in re.findall(r"`(\w+)`", row.group(2)):
                assert module not in layers, f"{module} is in two layers"
                layers[module] = int(row.group(1))
    return layers


def internal_imports(path: Path, package: str) -> set[str]:
    """The modules of ``package`` that the file at ``path`` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                found |= {name.split(".")[0] for name in names}
            elif node.module and node.module.split(".")[0] == package:
                found |= {node.module.split(".")[1]} if "." in node.module else set()
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package + ".")}
    return found


def service_modules() -> dict[str, set[str]]:
    return {f.stem: internal_imports(f, "bales_stream") for f in sorted(SERVICE.glob("*.py"))}


def test_every_service_module_is_in_exactly_one_documented_layer() -> None:
    assert set(documented_layers()) == set(service_modules())


def test_modules_import_only_their_own_layer_or_below_and_nothing_circular() -> None:
    layers = documented_layers()
    graph = service_modules()
    for module, imports in graph.items():
        for imported in imports - {"__version__"}:
            assert layers[imported] <= layers[module], (
                f"{module} (layer {layers[module]}) imports {imported} "
                f"(layer {layers[imported]}): move one of them, or update docs/architecture.md"
            )
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a cycle


def test_the_producer_library_never_imports_the_service() -> None:
    for path in PRODUCER.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "bales_stream" for n in names), path
