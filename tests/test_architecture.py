"""The package's shape: imports point one way through the layers, no cycle, no module too long to read."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sdpo"
# Lowest first; a unit may import its own modules and units of a lower layer only (as in sdpo/__init__.py).
LAYERS = [
    {"errors", "io", "config"},  # the foundation; io and config report through errors, as everything does
    {"data"},
    {"lm"},
    {"evaluation"},
    {"baselines"},
    {"training"},
    {"recommend", "benchmarks"},
    {"pipeline"},
    {"report"},
    {"cli"},
]
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every sdpo module `path` imports, at the top or inside a function (TYPE_CHECKING included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from sdpo.lm import precision` imports the module sdpo.lm.precision; `from ..lm import x` counts as sdpo.lm
            module = node.module or ""
            if node.level:
                package = module_name(path).split(".")
                package = package if path.name == "__init__.py" else package[:-1]
                module = ".".join(package[: len(package) - node.level + 1] + ([module] if module else []))
            names = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module for alias in node.names]
        else:
            continue
        found.update(name for name in names if name == "sdpo" or name.startswith("sdpo."))
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def unit(module: str) -> str:
    """The layered unit of a module: sdpo.lm.trunk -> lm, sdpo.recommend -> recommend."""
    return module.split(".")[1]


def layer(module: str) -> int:
    for number, units in enumerate(LAYERS):
        if unit(module) in units:
            return number
    raise AssertionError(f"{module} belongs to no layer; add its unit to LAYERS and to the map in sdpo/__init__.py")


def test_every_module_is_in_a_layer_and_imports_point_down():
    wrong = []
    for module, imports in graph().items():
        if module == "sdpo":  # the package root re-exports the public API lazily
            continue
        for target in imports:
            if target in ("sdpo", "sdpo.errors"):
                continue  # sdpo.__version__; UserError, which every layer raises
            if unit(target) != unit(module) and layer(target) >= layer(module):
                wrong.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other round in a circle, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, [*path, nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    # a package's __init__ that re-exports its own modules is not a cycle through them
    edges = {m: {t for t in imports if t != "sdpo" and not (m.count(".") and t.startswith(m + "."))}
             for m, imports in graph().items() if m != "sdpo"}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_checks_catch_what_they_look_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert layer("sdpo.lm.trunk") < layer("sdpo.evaluation.protocols") < layer("sdpo.cli.app")
    with pytest.raises(AssertionError, match="no layer"):
        layer("sdpo.somewhere_new")


def test_no_module_is_too_long_to_read():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these by concept (over {MAX_LINES} lines): {long}"
