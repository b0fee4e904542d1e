"""The house rules, checked on the source (docs/architecture.md, "Layout"): each module imports
only from its own floor or the ones below, no import cycle among derl's modules, nothing imports
the CLI, no stage entry point imports another, one pair of functions writes and reads an
embedding part, and nothing points outside the repository."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from typing import Dict, Set

from derl.launchers.registry import REGISTRY

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("derl", "datapipes", "models", "launchers", "benchmarks")  # the floors, bottom up
# Inside a floor, a sub-folder sits half a floor up: launchers/' stages (launchers/stages/) over
# the runtime they share (launchers/runtime/). benchmarks/ has no such order: the upstream
# harness times the seqrec study's reference SASRec as its peer.
UPPER_HALF = {"launchers": "stages"}
STAGE_MODULES = {spec.module for spec in REGISTRY.values() if spec.module is not None}
CLI = "derl.launchers.cli"


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] != "derl":
        parts.insert(0, "derl")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> Dict[str, Path]:
    return {_module_name(p): p for folder in FOLDERS for p in sorted((REPO / folder).rglob("*.py"))}


def _imports(path: Path, modules: Set[str]) -> Set[str]:
    """The derl modules `path` imports, anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def _graph() -> Dict[str, Set[str]]:
    sources = _sources()
    return {m: _imports(p, set(sources)) - {m} for m, p in sources.items()}


def _floor(module: str) -> float:
    """Its folder's place in FOLDERS, plus half for the upper sub-folder (UPPER_HALF), and the
    CLI above everything (`derl bench` reaches the benchmarks through it)."""
    if module == CLI:
        return math.inf
    parts = module.split(".")
    folder = parts[1] if len(parts) > 1 else "derl"
    upper = len(parts) > 3 and parts[2] == UPPER_HALF.get(folder)
    return FOLDERS.index(folder) + (0.5 if upper else 0)


def test_the_stage_modules_live_in_launchers_stages():
    assert {m.rsplit(".", 1)[0] for m in STAGE_MODULES} == {"derl.launchers.stages"}


def test_each_module_imports_only_from_its_floor_or_the_ones_below():
    upward = sorted(f"{m} -> {d}" for m, deps in _graph().items()
                    for d in deps if _floor(d) > _floor(m))
    assert not upward, f"imports from a higher floor: {upward}"


def test_no_import_cycle_among_derl_modules():
    graph = _graph()
    # A package's __init__ re-exporting its own submodules is not a cycle.
    edges = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")}
             for m, deps in graph.items()}
    state: Dict[str, int] = {}

    def visit(m: str, path: list) -> None:
        state[m] = 1
        for d in edges.get(m, ()):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [])


def test_nothing_imports_the_cli_and_no_stage_imports_another():
    graph = _graph()
    assert not [m for m, deps in graph.items() if CLI in deps]
    crossing = {m: deps & STAGE_MODULES for m, deps in graph.items()
                if m in STAGE_MODULES and deps & STAGE_MODULES}
    assert not crossing, f"stage entry points importing each other: {crossing}"
    assert STAGE_MODULES <= set(graph), "a stage module moved: update launchers/registry.py"


def test_one_pair_of_functions_writes_and_reads_an_embedding_part():
    """The part's Arrow type is built in one module only: every writer and reader of a part
    (export, refresh, the benchmarks, the tests' planted snapshots) goes through it."""
    pattern = re.compile(r"[\"']embedding[\"']\s*[:,]\s*pa\.")
    owners = {str(p.relative_to(REPO)) for folder in FOLDERS + ("tests",)
              for p in (REPO / folder).rglob("*.py") if pattern.search(p.read_text())}
    assert owners == {"datapipes/snapshots/parts.py"}, owners


def test_no_source_or_readme_line_points_outside_the_repository():
    files = [p for folder in FOLDERS + ("tests", "docs") for p in (REPO / folder).rglob("*")
             if p.suffix in (".py", ".md") and p != Path(__file__).resolve()]
    files += [REPO / "README.md", REPO / "Makefile"]
    # Public datasets are read by path from a folder beside the clone; nothing else outside.
    outside = re.compile(r"DESIGN\.md|\.\./shared/(?!data)|/work/")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1) if outside.search(line)]
    assert not offenders, offenders
