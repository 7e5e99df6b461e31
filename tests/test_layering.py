"""The package layout is the architecture: imports go one way (cli -> trainer -> core), each core
subpackage imports only the ones below it, and no two modules import each other, directly or
through others. Parsed from the source (every import statement, inside functions and
``TYPE_CHECKING`` blocks too), so it holds for imports that only run on some paths."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Where each installed package's source lives (pyproject's package-dir mapping).
SOURCE_DIRS = {"logitcache": REPO / "logitcache", "logitcache.trainer": REPO / "trainer", "logitcache.cli": REPO / "cli"}

#: What each part of logitcache may import (besides itself). A part is a core subpackage, a
#: top-level core module, or one of the upper layers ``trainer`` and ``cli``. The table is the
#: layering of docs/DESIGN.md; a new dependency is a decision to make there, not here alone.
ALLOWED = {
    "errors": set(),
    "codecs": set(),
    "data": {"errors"},
    "views": {"errors"},
    "distributed": {"errors"},
    "storage": {"errors", "codecs", "views"},
    "replay": {"errors", "storage", "views"},
    "build": {"errors", "codecs", "views", "storage"},
    "verify": {"errors", "codecs", "views", "storage", "data", "distributed", "build"},
    "api": {"errors", "codecs", "views", "storage", "data", "replay"},
    "trainer": {"errors", "codecs", "views", "storage", "data", "distributed", "replay", "build"},
    "cli": {"errors", "codecs", "views", "storage", "data", "distributed", "replay", "build", "verify", "trainer"},
}
CORE = set(ALLOWED) - {"trainer", "cli"}


def _modules() -> dict[str, Path]:
    """Every module of the three source trees, by its installed dotted name."""
    out = {}
    for package, root in SOURCE_DIRS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "logitcache" and len(parts) and parts[0] in ("trainer", "cli"):
                continue  # no such folders inside logitcache/; keep the mapping the only source
            out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The logitcache modules ``name`` imports (a package import counts as its ``__init__``)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from pkg import mod`` imports the module; ``from mod import name`` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def part_of(module: str) -> str:
    """The layering part a module belongs to (see ALLOWED)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "facade"
    return parts[1]


def test_every_module_has_a_part():
    parts = {part_of(m) for m in MODULES} - {"facade"}
    assert parts == set(ALLOWED), f"parts without a row in ALLOWED (or rows without modules): {parts ^ set(ALLOWED)}"


def test_no_import_cycles():
    """Tarjan's strongly connected components: every one must be a single module."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"


def test_imports_follow_the_layers():
    wrong = sorted(
        f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
        if part_of(m) != "facade" and part_of(t) != part_of(m) and part_of(t) not in ALLOWED[part_of(m)]
    )
    assert not wrong, "imports against the layering (tests/test_layering.py ALLOWED):\n" + "\n".join(wrong)


def test_core_never_imports_trainer_or_cli():
    wrong = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
                   if part_of(m) in CORE | {"facade"} and part_of(t) in ("trainer", "cli"))
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_facade():
    """``logitcache/__init__.py`` re-exports the public API lazily, by module name; no module
    imports names through it (that would hide a dependency from this test)."""
    importers = sorted(m for m, targets in GRAPH.items() if "logitcache" in targets)
    assert not importers, importers


def test_facade_names_resolve_to_where_they_live():
    """Each public name maps to the module that defines it (a re-export is not a home)."""
    import logitcache

    for name, module in logitcache._PUBLIC.items():
        tree = ast.parse(MODULES[module].read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert name in defined, f"logitcache.{name} maps to {module}, which does not define it"


@pytest.mark.parametrize("package", sorted({m for m in MODULES if MODULES[m].name == "__init__.py" and m.count(".") == 1
                                             and part_of(m) in CORE}))
def test_each_core_subpackage_says_its_job_and_imports(package):
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text()))
    assert doc and "Imports:" in doc, f"{package}/__init__.py: a docstring with its job and an 'Imports:' line"


def test_a_cycle_is_found():
    """The cycle check itself: a made-up pair importing each other is reported."""
    GRAPH["logitcache.views.plan"].add("logitcache.views.loader")
    try:
        with pytest.raises(AssertionError, match="import each other"):
            test_no_import_cycles()
    finally:
        GRAPH["logitcache.views.plan"].discard("logitcache.views.loader")


def test_modules_and_functions_stay_small():
    """No module over 400 lines, no function over 80 (the project's size rule), so a concept
    that grows is split by concept instead of by accident."""
    big = []
    for name, path in MODULES.items():
        text = path.read_text()
        if text.count("\n") > 400:
            big.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                big.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not big, "\n".join(big)
