"""The layer order, read from the first line of the README's "Layout" section, holds in the code.

That line lists the project's top-level folders bottom up, ``a → b, c → d``: each folder
imports only from the layers to its left, folders of one layer (``b, c``) do not import each
other, and no modules import each other in a circle. Every import of a project module counts,
wherever it is written: at the top, inside a function, or under ``TYPE_CHECKING``, so none of
them can dodge the order. Lazy imports of third-party packages (vllm, torch) are not looked at.
The checks read imports with ``ast``, importing nothing. Also here: what moving modules between
layers must keep (the import paths users rely on, every folder shipped) and the broker app
staying free of the tasks and objects of the processes that consume it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import tomllib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pytest

from core import signing
from core.settings import Settings
from inferq.cli import main
from inferq.client import Client
from inferq.signing import InvalidSignature, verify
from router import load_config
from tasks.app import create_celery

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_CODE = {"tests", "docs", "deploy", "scripts", "build", "dist"}


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    line: int
    where: str  # "top", "function" or "TYPE_CHECKING"

    def __str__(self) -> str:
        how = "" if self.where == "top" else f" ({self.where})"
        return f"{self.source}:{self.line} imports {self.target}{how}"


def layer_order() -> list[list[str]]:
    """The folders of each layer, bottom up, from the Layout section's first line."""
    text = README.read_text()
    section = re.search(r"^## Layout\n+(.+)$", text, re.MULTILINE)
    assert section, "README.md has no '## Layout' section with a first line"
    spans = re.findall(r"`([^`]*→[^`]*)`", section[1])
    assert spans, f"the Layout section's first line names no layers: {section[1]!r}"
    return [[name.strip().strip("/") for name in layer.split(",")] for layer in spans[0].split("→")]


def packages() -> list[str]:
    return sorted(
        p.parent.name
        for p in ROOT.glob("*/__init__.py")
        if p.parent.name not in NOT_CODE and not p.parent.name.startswith(".")
    )


def modules() -> dict[str, Path]:
    found = {}
    for package in packages():
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _resolve(name: str, known: Collection[str]) -> str | None:
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(node: ast.Import | ast.ImportFrom, module: str, path: Path) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parts, base] if base else parts)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def edges_in(module: str, path: Path, source: str, known: Collection[str]) -> list[Edge]:
    """The imports of project modules (``known``) in one module's source."""
    edges = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                inner = "function"
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                inner = "TYPE_CHECKING"
            if isinstance(child, ast.Import | ast.ImportFrom):
                resolved = {_resolve(t, known) for t in _targets(child, module, path)}
                for target in sorted(t for t in resolved if t and t != module):
                    if not module.startswith(f"{target}."):  # a package's own __init__
                        edges.append(Edge(module, target, child.lineno, inner))
            visit(child, inner)

    visit(ast.parse(source, str(path)), "top")
    return edges


def imports() -> list[Edge]:
    """Every import of one project module by another, with where it is written."""
    known = modules()
    return [
        edge
        for module, path in known.items()
        for edge in edges_in(module, path, path.read_text(), known)
    ]


def test_the_layout_line_places_every_folder_once() -> None:
    placed = [name for layer in layer_order() for name in layer]
    assert sorted(placed) == sorted(set(placed)), f"a folder is named twice: {placed}"
    assert sorted(placed) == packages(), (
        "the README's layer line must name each top-level package exactly once "
        f"(named: {sorted(placed)}; packages: {packages()})"
    )


def test_each_layer_imports_only_from_the_layers_below_it() -> None:
    rank = {name: index for index, layer in enumerate(layer_order()) for name in layer}
    wrong = []
    for edge in imports():
        source, target = edge.source.split(".")[0], edge.target.split(".")[0]
        if source != target and rank[target] >= rank[source]:
            direction = "sideways" if rank[target] == rank[source] else "upwards"
            wrong.append(f"{edge} ({direction}: {source}/ → {target}/)")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_modules_import_each_other_in_a_circle() -> None:
    graph: dict[str, set[str]] = {module: set() for module in modules()}
    for edge in imports():
        graph[edge.source].add(edge.target)
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles:\n" + "\n".join(", ".join(c) for c in cycles)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in sorted(graph[node]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import core.enums\n", [("core.enums", "top")]),
        ("def f():\n    from api.app import create_app\n", [("api.app", "function")]),
        (
            "from workers import runtime\n",
            [("workers", "top"), ("workers.runtime", "top")],
        ),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import workers.runtime\n",
            [("workers.runtime", "TYPE_CHECKING")],
        ),
        ("from . import y\n", [("bench.y", "top")]),
        ("def f():\n    import vllm\n", []),
    ],
)
def test_imports_are_found_wherever_they_are_written(
    source: str, expected: list[tuple[str, str]]
) -> None:
    known = {"core.enums", "api.app", "workers", "workers.runtime", "bench.x", "bench.y"}
    edges = edges_in("bench.x", Path("bench/x.py"), source, known)
    assert [(e.target, e.where) for e in edges] == expected


def test_a_cycle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_the_import_paths_users_rely_on_stay() -> None:
    """Webhook receivers import ``inferq.signing``; clients ``inferq.client``; the console
    script runs ``inferq.cli:main``. Modules may move below them; these paths do not."""
    assert (verify, InvalidSignature) == (signing.verify, signing.InvalidSignature)
    assert Client.__module__ == "inferq.client"
    [script] = importlib.metadata.entry_points(group="console_scripts", name="inferq")
    assert script.value == "inferq.cli:main" and script.load() is main


def test_every_folder_of_the_package_ships() -> None:
    """A layer's folder is installed (pyproject) and copied into the image (Dockerfile)."""
    shipped = set(packages()) - {"bench"}  # benchmarks run from a checkout
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    included = {
        name.rstrip("*") for name in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = set(re.findall(r"^COPY (\w+)/ ", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    assert included == shipped
    assert copied == shipped


def test_the_broker_app_holds_no_tasks_or_worker_objects() -> None:
    """The processes that consume a queue register its tasks (``workers.webhook_worker``,
    ``quality.scheduled``) and hand the consumer step its runtimes as a worker option."""
    settings = Settings()
    app = create_celery(settings, load_config(settings.config))
    assert [name for name in app.tasks if name.startswith("inferq.")] == []
    assert not hasattr(app, "runtimes") and not hasattr(app, "webhook_sender")
    app.close()
