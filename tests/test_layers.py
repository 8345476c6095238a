"""The import graph of vllm_align: no cycles between modules, no upward imports.

Every module of the package (``patches/`` is ``vllm_align.patches``) is parsed
with ``ast``; every ``import`` counts, at module level or inside a function
(a function-level import hides a cycle from Python, not from the design).
An import of ``a.b.c`` is an edge to the module ``a.b.c``, and also to the
packages ``a.b`` whose ``__init__`` Python runs first, except the root
``vllm_align`` (the plugin's entry point, whose ``register`` applies the
patches; every module sits under it) and the importer's own packages.

Layers, lowest first; a module may import its own layer or lower ones:

0. pure math, configuration and plotting, no vLLM: ``checks``, ``config``, ``fields``,
   ``methods``, ``mara/``, ``plotting``
1. the engine on vLLM's public plugin interfaces: ``engine/`` (the pair model, the batch
   state, the rollout worker extension)
2. every reach past those interfaces: ``patches/``, and the plugin entry point ``vllm_align``
   that applies them; patches import the engine, never the reverse
3. the data tools: ``data/`` (prompt sets, reward scorers, generate-pairs, sweep, eval)
4. the trainer: ``train/``
5. the toy world: ``toy/``
6. the command line and the demo: ``cli/``
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vllm_align"

LAYERS = (
    ("vllm_align.checks", "vllm_align.config", "vllm_align.fields", "vllm_align.methods",
     "vllm_align.mara", "vllm_align.plotting"),
    ("vllm_align.engine",),
    ("vllm_align", "vllm_align.patches"),
    ("vllm_align.data",),
    ("vllm_align.train",),
    ("vllm_align.toy",),
    ("vllm_align.cli",),
)

# Import edges allowed to close a cycle (none: keep it that way).
ALLOWED_EDGES: set[tuple[str, str]] = set()


def _module_files() -> dict[str, Path]:
    files = {}
    for base, name in ((ROOT / "vllm_align", PACKAGE), (ROOT / "patches", f"{PACKAGE}.patches")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([name, *parts])] = path
    return files


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = path.name == "__init__.py"
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the vllm_align modules it imports (see the module doc)."""
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                # ``from pkg import sub`` imports the submodule when there is one.
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                         for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                for i in range(2, len(parts) + 1):   # the packages run first, not the root
                    target = ".".join(parts[:i])
                    # A module inside a package does not import that package: Python
                    # has begun running its __init__ before any of its modules.
                    inside = module.startswith(target + ".")
                    if target in files and (i == len(parts) or not inside):
                        targets.add(target)
                if name == PACKAGE:
                    targets.add(PACKAGE)
        targets.discard(module)
        graph[module] = targets
    return graph


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != PACKAGE and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer; add it to LAYERS"
    return best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_parsed_and_layered():
    graph = import_graph()
    assert "vllm_align.patches.engine_args" in graph and "vllm_align.cli.main" in graph
    for module in graph:
        _layer(module)


def test_no_import_cycles():
    graph = {a: {b for b in targets if (a, b) not in ALLOWED_EDGES}
             for a, targets in import_graph().items()}
    found = [" <-> ".join(component) for component in cycles(graph)]
    assert not found, "import cycles: " + "; ".join(found)


def test_allowed_edges_still_exist():
    """An allow-listed edge that is gone must leave the list (it only shrinks)."""
    graph = import_graph()
    gone = sorted(f"{a} -> {b}" for a, b in ALLOWED_EDGES if b not in graph.get(a, ()))
    assert not gone, "no longer imported, drop from ALLOWED_EDGES: " + ", ".join(gone)


def test_layers_import_downward_only():
    graph = import_graph()
    upward = sorted(f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
                    for a, targets in graph.items() for b in targets if _layer(b) > _layer(a))
    assert not upward, "upward imports:\n" + "\n".join(upward)


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_cycle_finder(edges, expected):
    assert cycles(edges) == expected
