"""The package's import structure: no circles, and nothing imports from a floor above its own.

The floors are stated here and nowhere else. A module belongs to the floor of the longest name in
FLOORS that is it or a package holding it; a `__main__` module is a command line, the top floor.
Every import counts, the ones inside functions too: an import moved into a function to dodge a
circle is still a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import lsep_tune

# Bottom to top. A module may import from its own floor or any floor below.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("lsep_tune", "lsep_tune.errors", "lsep_tune.schema", "lsep_tune.files", "lsep_tune.stats",
                     "lsep_tune.tracking", "lsep_tune.cluster", "lsep_tune.presets")),
    ("parts", ("lsep_tune.models", "lsep_tune.objectives", "lsep_tune.data", "lsep_tune.vae", "lsep_tune.published",
               "lsep_tune.evaluation", "lsep_tune.sample", "lsep_tune.sample.solvers", "lsep_tune.sample.generate",
               "lsep_tune.sample.grid")),
    ("config", ("lsep_tune.config",)),
    ("checkpoints", ("lsep_tune.checkpoint",)),
    ("training and sampling", ("lsep_tune.train", "lsep_tune.sample.batch", "lsep_tune.mlflow_model",
                               "lsep_tune.mlflow_model_code")),
    ("search, confirmation, ablation, benchmarks", ("lsep_tune.search", "lsep_tune.ablate", "lsep_tune.bench",
                                                    "lsep_tune.clusters", "lsep_tune.cli")),
    ("command lines", ("*.__main__", "lsep_tune.preprocess", "lsep_tune.evaluate",
                       "lsep_tune.evaluation.train_digits_extractor")),
]


def modules(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} of every module under root/package."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(root: Path, package: str) -> list[tuple[str, str, bool]]:
    """(importer, imported module, inside a function) for every import of the package by itself; a
    `from pkg import name` counts as an import of pkg.name where that is a module, else of pkg."""
    mods = modules(root, package)
    found = []
    for name, path in mods.items():
        def visit(node, in_function: bool):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Import):
                    found.extend((name, a.name, in_function) for a in child.names
                                 if a.name.split(".")[0] == package)
                elif isinstance(child, ast.ImportFrom):
                    target = child.module or ""
                    if child.level:
                        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                        here = here[:len(here) - child.level + 1]
                        target = ".".join(here + ([target] if target else []))
                    if target.split(".")[0] == package:
                        for a in child.names:
                            found.append((name, f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target,
                                          in_function))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(path.read_text(), str(path)), False)
    return found


def floor_of(module: str, floors=FLOORS) -> int | None:
    if module.rsplit(".", 1)[-1] == "__main__":
        return next(i for i, (_, names) in enumerate(floors) if "*.__main__" in names)
    best, level = -1, None
    root = floors[0][1][0]  # the package itself: its own __init__ only, never a floor by default
    for i, (_, names) in enumerate(floors):
        for n in names:
            if (module == n or (n != root and module.startswith(n + "."))) and len(n) > best:
                best, level = len(n), i
    return level


def cycles(edges: list[tuple[str, str, bool]]) -> list[list[str]]:
    """One path around each circle of the import graph (a strongly connected component of two or more
    modules, or a module importing itself)."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def strong(v):  # Tarjan's algorithm
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
            if len(comp) > 1 or v in graph[v]:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    out = []
    for comp in comps:  # walk from the first module back to itself inside its component
        members, start = set(comp), min(comp)
        path, seen = [start], {start}
        while True:
            nxt = sorted(w for w in graph[path[-1]] if w in members)
            back = start in nxt
            if back:
                out.append(path + [start])
                break
            step = next((w for w in nxt if w not in seen), None)
            if step is None:
                out.append(sorted(comp))
                break
            path.append(step)
            seen.add(step)
    return out


def upward(edges: list[tuple[str, str, bool]], floors=FLOORS) -> list[str]:
    return [f"{a} ({floors[floor_of(a, floors)][0]}) imports {b} ({floors[floor_of(b, floors)][0]})"
            + (" inside a function" if in_function else "")
            for a, b, in_function in edges if floor_of(b, floors) > floor_of(a, floors)]


ROOT = Path(lsep_tune.__file__).resolve().parent.parent


def test_every_module_has_a_floor():
    unplaced = [m for m in modules(ROOT, "lsep_tune") if floor_of(m) is None]
    assert not unplaced, f"give these modules a floor in FLOORS: {unplaced}"


def test_no_import_circles():
    found = cycles(imports(ROOT, "lsep_tune"))
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_nothing_imports_from_a_floor_above():
    found = upward(imports(ROOT, "lsep_tune"))
    assert not found, "upward imports: " + "; ".join(found)


def test_the_checks_see_circles_and_upward_imports_inside_functions(tmp_path):
    """The reader on a small package: a circle closed by an in-function import, an upward import
    inside a function, a relative import."""
    pkg = tmp_path / "toy"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("from .a import f\n")
    (pkg / "low" / "a.py").write_text("def f():\n    from toy.low.b import g\n    return g\n")
    (pkg / "low" / "b.py").write_text("import toy.low.a\n\ndef g():\n    from toy import top\n")
    (pkg / "top.py").write_text("from toy.low import a\n")
    edges = imports(tmp_path, "toy")
    assert ("toy.low", "toy.low.a", False) in edges
    assert ("toy.low.a", "toy.low.b", True) in edges
    assert cycles(edges) == [["toy.low.a", "toy.low.b", "toy.low.a"]]
    floors = [("low", ("toy", "toy.low")), ("top", ("toy.top",))]
    assert floor_of("toy.elsewhere", floors) is None  # the package's name places its __init__ alone
    assert upward(edges, floors) == ["toy.low.b (low) imports toy.top (top) inside a function"]
    (pkg / "low" / "a.py").write_text("def f():\n    return 1\n")
    assert cycles(imports(tmp_path, "toy")) == []


def error_readers(root: Path, package: str) -> list[str]:
    """The modules that read a pydantic ValidationError's entries (`err.errors()`): each one is a
    translator of pydantic's wording into the one-line InputError."""
    return sorted(name for name, path in modules(root, package).items()
                  if any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "errors"
                         for n in ast.walk(ast.parse(path.read_text(), str(path)))))


def test_one_pydantic_error_translator():
    """Config, space and arms files all word a validation error through lsep_tune.schema.explain."""
    assert error_readers(ROOT, "lsep_tune") == ["lsep_tune.schema"]
