"""How the package is built: what may import what, and what importing it costs."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import kerastl

PACKAGE = Path(kerastl.__file__).parent
COMMAND_LINE = ("kerastl.cli", "kerastl.arguments")  # the `kerastl` command and its flags: on top of both wings


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
            for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, inside_functions: bool | None = None) -> set[str]:
    """The kerastl modules `path` imports (only those inside functions, or only top-level ones)."""
    tree = ast.parse(path.read_text())
    nested = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn)}
    found = set()
    for node in ast.walk(tree):
        if inside_functions is not None and (id(node) in nested) != inside_functions:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kerastl"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("kerastl"))
    return found & set(_modules())


def test_the_core_never_imports_the_search_wing():
    for name, path in _modules().items():
        if not name.startswith("kerastl.tune") and name not in COMMAND_LINE:
            assert not {m for m in _imports(path) if m.startswith("kerastl.tune")}, name


def test_there_are_no_import_circles():
    graph = {name: _imports(path) - {name} for name, path in _modules().items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for other in graph[name]:
            assert state.get(other) != "open", " -> ".join([*trail, name, other])
            if other not in state:
                visit(other, [*trail, name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_only_the_command_line_imports_inside_functions():
    """The CLI loads TensorFlow only once a command needs it; no other module hides an import."""
    for name, path in _modules().items():
        if name != "kerastl.cli":
            assert not _imports(path, inside_functions=True), name


def test_no_private_keras_or_kerastuner_api_outside_its_wrapper():
    for name, path in _modules().items():
        if name != "kerastl.tune.internals":
            text = path.read_text()
            assert "keras.src" not in text and "keras_tuner.src" not in text, name
            assert "_populate_initial_space" not in text, name


def test_importing_kerastl_and_its_command_line_does_not_import_tensorflow():
    code = "import sys, kerastl, kerastl.cli; print('tensorflow' in sys.modules, kerastl.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", importlib.metadata.version("kerastl")] and out[1].startswith("0.2")
    assert "run_search" in kerastl.__all__ and callable(kerastl.run_search)  # resolved on first use
