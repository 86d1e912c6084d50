"""The layers hold: no import cycle inside ``dicom_node`` (counting imports inside
functions and under TYPE_CHECKING, which are cycles all the same), ``dicom_node``
imports nothing from ``training``, ``pipelines`` nothing from either, and only
``dicom_node/db/`` writes SQL."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module this file imports, anywhere in it (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = (
        _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    )
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def _graph(package: str) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in files} - {name} for name, path in files.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_node() -> None:
    graph = _graph("dicom_node")
    # a package importing its own submodules (registration) is not a layering cycle
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    assert _cycles(graph) == []


def test_layers() -> None:
    for path in (ROOT / "dicom_node").rglob("*.py"):
        bad = {m for m in _imports(path) if m == "training" or m.startswith("training.")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
    for path in (ROOT / "pipelines").rglob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[0] in ("training", "dicom_node")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


_WRITE_SQL = re.compile(r"""["'](\s*)(INSERT|UPDATE|DELETE|CREATE|ALTER|DROP)\b""", re.I)


def test_only_the_index_writes_sql() -> None:
    for path in (ROOT / "dicom_node").rglob("*.py"):
        if path.parent.name == "db" and path.parent.parent.name == "dicom_node":
            continue
        assert not _WRITE_SQL.search(path.read_text()), f"{path.relative_to(ROOT)} writes SQL"


def test_the_node_process_starts_without_torch() -> None:
    """The node's own process names the pipelines but runs none: torch and the
    pipelines load in its worker processes (``dicom_node.sandbox``), so a restart
    after a crash or a kill listens again in half the time (2.9 s instead of 5.5-5.9 s
    to the storage SCP on the development machine, measured by hand)."""
    code = (
        "import sys, dicom_node.cli, dicom_node.service, dicom_node.routing\n"
        "import pipelines\n"
        "assert pipelines.names() == sorted(pipelines.base.BUILTIN), pipelines.names()\n"
        "heavy = sorted(m for m in ('torch', 'pipelines.perfusion', 'pipelines.coronary',"
        " 'pipelines.rotational', 'pipelines.dsa_av') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_each_builtin_module_registers_the_pipeline_it_is_listed_for() -> None:
    code = (
        "import importlib\n"
        "from pipelines import base\n"
        "for name, module in base.BUILTIN.items():\n"
        "    importlib.import_module(module)\n"
        "    assert name in base._REGISTRY, (name, module)\n"
        "assert set(base._REGISTRY) == set(base.BUILTIN), sorted(base._REGISTRY)\n"
        "assert base.get('minip').name == 'minip'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
