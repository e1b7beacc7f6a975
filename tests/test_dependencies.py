"""The package's dependencies (shared/design.md, "Layout"): dependencies point one way, down the
layers below; nothing imports a layer above it, and no module imports itself back through
others. Imports inside functions count: a lazy import is still a dependency."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mixmae_jax"

# Top to bottom. A module may import its own layer's modules (without a circle) and the layers
# below it.
LAYERS = (
    ("tools", ("cli", "bench", "gpu_check", "digits_experiment", "visualize")),
    ("tasks", ("tasks",)),
    ("evaluation", ("eval",)),
    ("training", ("train",)),
    ("pytorch interop", ("interop",)),
    ("config", ("config",)),
    ("methods", ("methods",)),
    ("models", ("models",)),
    ("foundations", ("data", "parallel", "imaging", "numerics", "console", "outputs")),
)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every mixmae_jax module `path` imports, at any depth of its code."""
    name = _module_name(path) if PACKAGE.parent in path.parents else path.stem
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mixmae_jax")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.startswith("mixmae_jax"):
                out.add(base)
                out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, the package's own __init__ left out (it
    imports nothing)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules.pop("mixmae_jax")
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for index, (_, names) in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module}: in no layer of tests/test_dependencies.py (add it)")


def test_every_module_is_in_a_layer():
    for module in _graph():
        _layer(module)


def test_nothing_imports_a_layer_above_it():
    upward = []
    for module, imported in sorted(_graph().items()):
        for other in sorted(imported):
            if _layer(other) < _layer(module):
                upward.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {other} "
                              f"({LAYERS[_layer(other)][0]})")
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    graph = _graph()
    # A package's __init__ importing its own submodules (a registry) is not a circle through
    # the package, so edges to a package's own __init__ from inside it are left out.
    for module in graph:
        graph[module] = {m for m in graph[module] if not module.startswith(m + ".")}
    state, circles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The parser finds a function-level import and a relative one (or the tests above would
    pass on an empty graph)."""
    f = tmp_path / "mod.py"
    f.write_text("def g():\n    from mixmae_jax.train import trainer\n")
    assert _imports(f) == {"mixmae_jax.train", "mixmae_jax.train.trainer"}
    graph = _graph()
    assert "mixmae_jax.train.experiment" in graph["mixmae_jax.train.trainer"]
    assert len(graph) > 40
