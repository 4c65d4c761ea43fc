"""The package's layers point one way (docs/CONTRACTS.md, `.importlinter`): core → models → objectives → training →
export → eval → workflows → cli, the toy world named only from eval upwards, the files shipped into exported folders
importing nothing of stepdistill; no import cycle between modules; every internal import at module level."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import grimp

from helpers import REPO

PACKAGE = REPO / "stepdistill"


def _import_graph() -> grimp.ImportGraph:
    return grimp.build_graph("stepdistill", cache_dir=None)


def _lint(config: Path) -> subprocess.CompletedProcess:
    code = ("from importlinter.cli import lint_imports; "
            f"raise SystemExit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_every_layer_contract_in_importlinter_is_kept():
    result = _lint(REPO / ".importlinter")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout


def test_import_linter_reports_a_broken_contract(tmp_path):
    """The check can fail: a contract the code breaks (the workflows do import the models) is reported."""
    config = tmp_path / "broken.ini"
    config.write_text("[importlinter]\nroot_package = stepdistill\n\n[importlinter:contract:x]\nname = x\n"
                      "type = forbidden\nsource_modules =\n    stepdistill.workflows\nforbidden_modules =\n"
                      "    stepdistill.models\n")
    result = _lint(config)
    assert result.returncode == 1 and "stepdistill.workflows" in result.stdout, result.stdout + result.stderr


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.find_modules_directly_imported_by(node):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_between_modules():
    graph = _import_graph()
    # the graph is the real one: a known edge is there
    assert "stepdistill.models.teacher" in graph.find_modules_directly_imported_by("stepdistill.workflows.single_run")
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    class Graph:
        modules = {"a", "b", "c", "d"}

        @staticmethod
        def find_modules_directly_imported_by(m):
            return {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}[m]

    assert _cycles(Graph()) == [["a", "b", "c"]]


def _function_level_imports(source: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("stepdistill"):
                    lines.append(sub.lineno)
                elif isinstance(sub, ast.Import) and any(a.name.startswith("stepdistill") for a in sub.names):
                    lines.append(sub.lineno)
    return lines


def test_internal_imports_are_at_module_level():
    assert _function_level_imports("def f():\n    from stepdistill.core import schedule\n") == [2]
    offenders = [f"{path.relative_to(REPO)}:{line}" for path in sorted(PACKAGE.rglob("*.py"))
                 for line in _function_level_imports(path.read_text(encoding="utf-8"))]
    assert offenders == []


def _probes(source: str) -> list[str]:
    """``getattr``/``hasattr`` calls whose object is an objective or a generator (by name)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            target = ast.unparse(node.args[0]) if node.args else ""
            if "objective" in target or "generator" in target:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_trainer_and_export_do_not_probe_objectives_or_generators():
    """Capabilities are declared (``Requirements``, ``UpdatePlan``, ``Generator.kind``), not probed."""
    assert _probes("if hasattr(self.objective, 'x'): pass\ny = getattr(generator, 'kind', None)\n") != []
    files = [PACKAGE / "training" / "trainer.py", *sorted((PACKAGE / "export").rglob("*.py"))]
    offenders = [f"{path.relative_to(REPO)}:{probe}" for path in files for probe in _probes(path.read_text())]
    assert offenders == []
