"""The package's shape, checked from the modules' own imports (their ASTs; nothing is imported).

- No import cycle between moelite's modules (every `import` / `from ... import` naming a moelite module, wherever it
  stands in the file: a cycle through a function-level import is still a cycle).
- Imports stay at module top, except optional dependencies (the names in OPTIONAL) and the command line's deferred
  heavy imports (moelite/cli keeps torch and the engine out of `moelite --help`).
- The subpackages show the architecture: core does not reach up into serve, emoe, eval or the CLI; serve and emoe do
  not import eval.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "moelite"
#: imports allowed inside functions: dependencies a machine may lack (GPU kernels, plotting, server internals)
OPTIONAL = ("triton", "matplotlib", "uvicorn", "torch._dynamo", "fastapi.middleware")


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, ast.stmt, bool]]:
    """(imported moelite module, statement, at module top) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            out.append((t, node, id(node) in top))
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, Path]]:
    mods = _modules()
    known = set(mods)
    graph = {m: {t for t, _, _ in _imports(m, p, known) if t in known and t != m} for m, p in mods.items()}
    return graph, mods


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    graph, _ = _graph()
    assert len(graph) > 30, "the module scan found too few modules"
    assert _cycles(graph) == []


def test_imports_at_module_top_except_optional_dependencies():
    mods = _modules()
    known = set(mods)
    bad = []
    for name, path in mods.items():
        if name == "moelite.cli" or name.startswith("moelite.cli."):
            continue  # the command line defers heavy imports so that `moelite --help` is fast
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if all(n.startswith(OPTIONAL) for n in names):
                continue
            bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno} imports {', '.join(names)}")
    del known
    assert bad == [], "imports inside functions (move them to the module top):\n" + "\n".join(bad)


def test_layers_point_down():
    graph, _ = _graph()
    above_core = ("moelite.serve", "moelite.emoe", "moelite.eval", "moelite.cli", "moelite.engine")
    rules = {"moelite.core": above_core, "moelite.serve": ("moelite.eval", "moelite.emoe", "moelite.cli"),
             "moelite.emoe": ("moelite.eval", "moelite.cli", "moelite.serve")}
    bad = []
    for mod, deps in graph.items():
        for prefix, banned in rules.items():
            if mod == prefix or mod.startswith(prefix + "."):
                bad += [f"{mod} -> {d}" for d in deps if d.startswith(banned)]
    assert bad == []
