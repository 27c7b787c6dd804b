"""The package's shape (issue 28): its modules in layers that import only downwards, no import circles, no medkd
import hidden in a function without a stated reason, no module over 600 lines, no function over 80 lines.

Each test lists every offender (file, line, what) in its failure message. Read from the source with ``ast``: nothing
of medkd is imported. Module-level, ``TYPE_CHECKING`` and in-function imports all count; a package's implicit import
of its ``__init__.py`` does not (Python runs it first, whoever imports a submodule).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medkd"

# bottom to top: a module may import the modules of its own layer and of those below (names under medkd/; "__init__"
# is medkd/__init__.py, the lazy sub-module loader every package uses)
LAYERS = [
    ("__init__", "errors", "runtime"),
    ("bundles", "config_checks"),
    ("knowledge",),
    ("data",),
    ("training",),
    ("planning", "prepare", "validation"),
    ("tools", "bundle_generation"),
    ("__main__",),
]
# (importer, imported): why; at most one import may go up the layers
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}
DEFERRED = "# deferred import:"  # the comment an in-function medkd import carries, with its reason
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module names
    imported: str
    path: str  # the importer's file, relative to the repository
    line: int
    in_function: bool
    commented: bool  # whether a line of the statement carries DEFERRED


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@cache
def _tree(module: str) -> tuple[ast.Module, list[str]]:
    text = _modules()[module].read_text(encoding="utf-8")
    return ast.parse(text), text.splitlines()


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The medkd modules an import statement of ``module`` loads (``from medkd.x import y``: ``medkd.x.y`` when it
    is a module, else ``medkd.x``)."""
    modules = _modules()
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    base = node.module or ""
    if node.level:
        package = module if _modules()[module].name == "__init__.py" else module.rpartition(".")[0]
        package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{package}.{base}" if base else package
    found = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    return found or ([base] if base in modules else [])


def _function_ranges(tree: ast.Module) -> list[tuple[int, int]]:
    return [(n.lineno, n.end_lineno) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


@cache
def _imports() -> list[Import]:
    found = []
    for module, path in _modules().items():
        tree, lines = _tree(module)
        functions = _function_ranges(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            in_function = any(start < node.lineno <= end for start, end in functions)
            commented = any(DEFERRED in line for line in lines[node.lineno - 1 : node.end_lineno])
            rel = str(path.relative_to(PACKAGE.parent))
            found += [Import(module, t, rel, node.lineno, in_function, commented) for t in _targets(module, node)]
    return found


def _top(module: str) -> str:
    """The name under medkd/ that places ``module`` in :data:`LAYERS`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int | None:
    return next((i for i, names in enumerate(LAYERS) if _top(module) in names), None)


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself), by Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(edges.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1 or node in edges.get(node, ()):
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return circles


def test_circles_are_found_in_a_small_graph():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": {"a"}}) == [["a", "b", "c"], ["d"]]


def test_every_module_belongs_to_a_layer():
    missing = sorted(module for module in _modules() if _layer(module) is None)
    assert not missing, f"modules of no layer (add them to LAYERS in {__file__}): {missing}"


def test_no_import_circles():
    edges: dict[str, set[str]] = {}
    for i in _imports():
        edges.setdefault(i.importer, set()).add(i.imported)
    offenders = []
    for circle in _circles(edges):
        inside = [i for i in _imports() if {i.importer, i.imported} <= {*circle}]
        ties = [f"  {i.path}:{i.line} imports {i.imported}" for i in inside]
        offenders += [f"circle of {len(circle)} modules: {', '.join(circle)}", *ties]
    why = "import circles (module-level, TYPE_CHECKING and in-function imports)"
    assert not offenders, f"{why}:\n" + "\n".join(offenders)


def test_imports_go_down_the_layers():
    assert len(ALLOWED_UPWARD) <= 1, "at most one import may go up the layers"
    upward = [
        f"{i.path}:{i.line} imports {i.imported} ({_top(i.importer)} -> {_top(i.imported)})"
        for i in sorted(_imports(), key=_where)
        if (_layer(i.importer) or 0) < (_layer(i.imported) or 0) and (i.importer, i.imported) not in ALLOWED_UPWARD
    ]
    assert not upward, f"imports from a lower layer to a higher one (LAYERS: {LAYERS}):\n" + "\n".join(upward)


def test_every_in_function_medkd_import_says_why():
    hidden = [i for i in _imports() if i.in_function and not i.commented]
    lines = dict.fromkeys(f"{i.path}:{i.line} imports {i.imported}" for i in sorted(hidden, key=_where))
    assert not lines, (
        f"medkd imports inside a function without a '{DEFERRED} <reason>' comment on their line (move them to the "
        "top, or say why they cannot be there):\n" + "\n".join(lines)
    )


def _where(i: Import) -> tuple[str, int]:
    return i.path, i.line


def test_no_module_over_600_lines():
    lines = {module: len(_tree(module)[1]) for module in _modules()}
    long = [f"{_modules()[m].relative_to(PACKAGE.parent)}: {n} lines" for m, n in lines.items() if n > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_no_function_over_80_lines():
    long = []
    for module, path in _modules().items():
        tree, _ = _tree(module)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (def to last line):\n" + "\n".join(long)
