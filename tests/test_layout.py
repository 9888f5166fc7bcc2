"""The package's layers, read from the source: no import cycle, and each layer imports only the
layers below it (the order of `LAYERS`, as ARCHITECTURE.md draws it)."""

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "pipeline"
# Bottom to top; a module may import its own layer and those before it. Top-level modules
# outside this list (the CLIs predict, export, runs) sit above every layer.
LAYERS = ["errors", "durable", "distributed", "data", "model", "cache", "config", "extraction",
          "train"]


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`, where `python -m` hands over to a module's command line."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__")


def _imports(path: Path, lazy: bool) -> set[str]:
    """The `pipeline.*` modules `path` imports at module level (with `lazy`: anywhere but in its
    `__main__` block)."""
    tree = ast.parse(path.read_text())
    tree.body = [node for node in tree.body if not _is_main_block(node)]
    nodes = ast.walk(tree) if lazy else iter(tree.body)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
    return found


def _graph(lazy: bool) -> dict[str, set[str]]:
    return {_module(p): _imports(p, lazy) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int | None:
    head = module.split(".")[1] if "." in module else None  # pipeline.<head>[.<module>]
    return LAYERS.index(head) if head in LAYERS else None


@pytest.mark.parametrize("lazy", [False, True], ids=["module level", "lazy too"])
def test_no_module_imports_itself_back(lazy):
    # Lazy imports count too: two modules that import each other inside functions are one
    # concern split in two (as data/images and data/dicom were).
    graph = _graph(lazy=lazy)
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue  # `pipeline.data` as a package name in `from pipeline.data import x`
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_each_layer_imports_only_the_layers_below():
    # Lazy imports count too: hiding a dependency in a function does not remove it.
    for module, imported in _graph(lazy=True).items():
        mine = _layer(module)
        if mine is None:
            continue
        above = sorted(m for m in imported if (_layer(m) is None and m != "pipeline")
                       or (_layer(m) or 0) > mine)
        assert not above, f"{module} imports {above}, above its layer"
