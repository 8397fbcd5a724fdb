"""The package's import graph has no cycle, and the stages are declared once (issue 21).

Every import of one ``specialkit`` module by another counts: module level, inside a function (a "lazy" import is
still a dependency, only a hidden one) and under ``if TYPE_CHECKING`` (a type annotation names a layer too). The
graph is built from the source with ``ast``, so nothing is imported to build it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from specialkit import cli, config, stages

PACKAGE = Path(__file__).resolve().parent.parent / "specialkit"


def _imported(node: ast.AST, modules: set[str]) -> set[str]:
    """The specialkit modules one import statement names."""
    out: set[str] = set()
    if isinstance(node, ast.ImportFrom):
        if node.level == 1 or (node.module or "").split(".")[0] == "specialkit":
            parts = (node.module or "").split(".")
            base = parts[1] if parts[0] == "specialkit" and len(parts) > 1 else (parts[0] if node.level == 1 else "")
            if base:
                out.add(base)
            else:
                out |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.Import):
        out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("specialkit.")}
    return out & modules


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the specialkit modules it imports anywhere in its source (itself left out)."""
    modules = {p.stem for p in package.glob("*.py")}
    graph = {}
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[path.stem] = set().union(*(_imported(n, modules) for n in ast.walk(tree))) - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_of_specialkit_has_no_cycle():
    graph = import_graph()
    assert (
        len(graph) > 30 and "pipeline" in graph["runner"] and "view" in graph["metrics"]
    )  # the graph was really built
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .c import g\n    return g\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n")
    (tmp_path / "d.py").write_text("import os\n")
    assert cycles(import_graph(tmp_path)) == [["a", "b", "c"]]


def test_the_numbers_and_the_report_depend_on_the_read_only_view_not_on_the_pipeline():
    graph = import_graph()
    below = {"metrics", "report", "frontier", "transfer", "cost", "view", "store", "stages"}
    for module in below:
        reach, todo = set(), [module]
        while todo:
            for m in graph[todo.pop()] - reach:
                reach.add(m)
                todo.append(m)
        assert not reach & {"pipeline", "runner", "study", "cli", "launch"}, module


def test_stages_and_errors_import_nothing_of_the_kit():
    graph = import_graph()
    assert graph["stages"] == set() and graph["errors"] == set()


def test_every_list_of_stages_is_derived_from_the_one_declaration():
    from specialkit import checkpoints, pipeline, study

    assert pipeline.STAGES == stages.NAMES
    assert config.KEY_STAGES == stages.KEY_GROUPS == ("data", *dict.fromkeys(s.group for s in stages.STAGES))
    assert cli._STAGES == (*(n.replace("_", "-") for n in stages.NAMES), "report")
    assert set(cli._TORCHRUN_STAGES) == {n.replace("_", "-") for n in stages.TORCHRUN}
    assert study._ADOPTABLE == stages.ADOPTABLE and set(checkpoints._STAGE_COMMANDS) == set(stages.NAMES)
    assert set(pipeline._RECIPES) == set(stages.NAMES)
    # no module spells the stage list out by hand any more
    literal = re.compile(r'"generalist",\s*"clusters",\s*"specialists"')
    spelled = [p.name for p in PACKAGE.glob("*.py") if p.name != "stages.py" and literal.search(p.read_text())]
    assert spelled == []


@pytest.mark.parametrize("name", stages.NAMES)
def test_a_stage_comes_after_every_stage_it_needs(name):
    position = stages.NAMES.index(name)
    assert all(stages.NAMES.index(n) < position for n in stages.needs_all(name))
