"""The four layers as the README draws them, checked on the source (ast, no imports run).

- no import cycles between the project's modules, counting imports inside functions too;
- nothing imports upward: the runtime never reaches the torch backend or the export, the torch backend never
  reaches the export, the runtime, training or the entry points (CLI, Restorer, restore-many), and the export
  never reaches the runtime;
- the core reaches a backend only inside a function (loaded on use), so ``import pure_lite`` stays torch-free
  (``tests/test_cli_and_imports.py`` checks that at run time too).
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE_DIRS = {"pure_lite": ROOT / "pure_lite", "pure_lite.export": ROOT / "export", "pure_lite.runtime": ROOT / "runtime"}
BACKENDS = ("pure_lite.torch_backend", "pure_lite.export", "pure_lite.runtime")


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if package == "pure_lite" and parts[:1] in (["export"], ["runtime"]):
                continue
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, bool]]:
    """(imported project module, whether at module level) for each import in ``name``'s source."""
    path = MODULES[name]
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = ".".join(base[:len(base) - node.level + 1] + [node.module or ""]) if node.level else node.module
            target = target.rstrip(".")
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found += [(t, id(node) in top) for t in targets if t in MODULES and t != name]
    return found


def _in(name: str, *layers: str) -> bool:
    return any(name == layer or name.startswith(layer + ".") for layer in layers)


def test_the_layers_exist_as_folders():
    assert _in("pure_lite.torch_backend.decoder", "pure_lite.torch_backend")
    for layer in BACKENDS:
        assert layer in MODULES, layer
    assert sum(_in(m, "pure_lite.torch_backend") for m in MODULES) >= 8


def test_no_import_cycles():
    graph = {m: {t for t, _ in _imports(m)} for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    cycles = [c for m in sorted(MODULES) if m not in state and (c := visit(m, []))]
    assert cycles == []


def test_nothing_imports_upward():
    entry_points = ("pure_lite.cli", "pure_lite.restorer", "pure_lite.batch", "pure_lite.demo", "pure_lite.train")
    forbidden = {
        "pure_lite.runtime": ("pure_lite.torch_backend", "pure_lite.export", "pure_lite.train", *entry_points),
        "pure_lite.torch_backend": ("pure_lite.export", "pure_lite.runtime", *entry_points),
        "pure_lite.export": ("pure_lite.runtime", *entry_points),
    }
    wrong = [(m, t) for m in MODULES for layer, bad in forbidden.items() if _in(m, layer)
             for t, _ in _imports(m) if _in(t, *bad)]
    assert wrong == []


# the CLI's export options default to QuantizationConfig's fields (one place for a default), a dataclass
# whose module imports nothing at module level but the standard library
EAGER_ALLOWED = {("pure_lite.cli", "pure_lite.export.quantize")}


def _top_level_third_party(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text())
    roots = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return roots - set(sys.stdlib_module_names) - {"pure_lite"}


def test_the_core_loads_a_backend_only_when_used():
    core = [m for m in MODULES if not _in(m, *BACKENDS, "pure_lite.train")]
    eager = {(m, t) for m in core for t, top in _imports(m) if top and _in(t, *BACKENDS)}
    assert eager - EAGER_ALLOWED == set()
    assert [t for _, t in EAGER_ALLOWED if _top_level_third_party(t)] == []
    assert _top_level_third_party("pure_lite.torch_backend.decoder") >= {"torch", "numpy"}  # the check sees them
    assert any(_in(t, "pure_lite.torch_backend") for t, _ in _imports("pure_lite.restorer"))  # the check sees lazy ones
