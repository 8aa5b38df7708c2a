"""The layout's two rules: no import circle inside ``pipelines/``, and config modules that
import nothing heavy (ARCHITECTURE.md, "Configuration")."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO

HEAVY = ("torch", "transformers", "deepspeed", "ray", "mlflow")
# The config modules: the assembly and each stage's, and those of the packages below.
CONFIG_MODULES = sorted(
    ".".join(path.relative_to(REPO).with_suffix("").parts)
    for path in REPO.glob("pipelines/**/config.py")  # pipelines/config.py included
) + [
    "tokenization.config",
    "training.config",
    "training.train_config",
    "evaluation.config",
    "infra.config",
    "infra.ray_runtime",
    "infra.storage",
    "infra.tracking",
]


def module_names(package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` (a package is its __init__)."""
    names = {}
    for path in (REPO / package).rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """Every module of ``modules`` that ``path`` imports anywhere: at the top, inside a
    function or under TYPE_CHECKING (a lazy import still ties the two modules together)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `from pkg import function` -> pkg
                name = name.rpartition(".")[0]
            if name:
                yield name


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_circles(graph) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_inside_pipelines() -> None:
    modules = module_names("pipelines")
    graph = {
        name: {other for other in imported(path, modules) if other != name}
        for name, path in modules.items()
    }
    assert len(graph) > 40  # the walk found the package
    assert import_circles(graph) == []


def test_config_modules_import_nothing_heavy() -> None:
    """Each config module in a fresh interpreter, in turn: the heavy modules it brought."""
    script = (
        "import importlib, json, sys\n"
        "heavy = tuple(sys.argv[1].split(','))\n"
        "brought = {}\n"
        "for name in sys.argv[2:]:\n"
        "    importlib.import_module(name)\n"
        "    loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "    brought[name] = loaded\n"
        "    if loaded: break\n"
        "print(json.dumps(brought))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script, ",".join(HEAVY), *CONFIG_MODULES],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    brought = json.loads(done.stdout)
    assert "pipelines.shard.config" in brought and "pipelines.train.config" in brought
    assert {name: mods for name, mods in brought.items() if mods} == {}
    assert list(brought) == CONFIG_MODULES
