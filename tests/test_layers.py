"""How the package is built: which wing may import which, module sizes, and what importing costs."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import kerastl

PACKAGE = Path(kerastl.__file__).parent
# The wings, lowest first: a module imports only from its own wing or a lower one. "kerastl" is the
# package's own top level (config, errors, version, storage, devices), which every wing may use.
WINGS = ("kerastl", "reports", "data", "models", "features", "training", "runs", "tune", "cli")
TOP_LEVEL_ALWAYS = {"__init__", "__main__", "version", "errors", "config"}
MAX_TOP_LEVEL_OTHERS = 6
MAX_LINES = 400
# the functions that take the whole RunConfig: the boundaries (check, resolve, plan, run, search) and what
# writes or changes a config; the rest take the part they use (a DataConfig, a TrainConfig, a few values)
MAX_TAKING_RUN_CONFIG = 15
# what must import without TensorFlow (or Keras): the package, the command line before a command
# runs, the reports, and the checks that run before TensorFlow loads
LIGHT = ("kerastl", "kerastl.cli.main", "kerastl.config", "kerastl.devices", "kerastl.data.tables",
         "kerastl.data.imagefiles", "kerastl.runs.checks", "kerastl.reports.evaluation", "kerastl.reports.plots",
         "kerastl.reports.html",
         "kerastl.reports.card", "kerastl.reports.facts", "kerastl.tune.config")


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
            for path in PACKAGE.rglob("*.py")}


def _wing(module: str) -> str:
    if module == "kerastl.__main__":  # `python -m kerastl` is the command line
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in WINGS) else "kerastl"


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


def test_every_module_belongs_to_a_wing_and_imports_only_downward():
    for name, path in _modules().items():
        wing = _wing(name)
        assert wing in WINGS, name
        for other in _imports(path) - {"kerastl"}:
            assert WINGS.index(_wing(other)) <= WINGS.index(wing), f"{name} ({wing}) imports {other}"


def test_the_top_level_holds_few_modules_and_none_is_long():
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert len(top - TOP_LEVEL_ALWAYS) <= MAX_TOP_LEVEL_OTHERS, sorted(top - TOP_LEVEL_ALWAYS)
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_few_functions_take_the_whole_run_config():
    taking = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
                if any(a.annotation is not None and "RunConfig" in ast.unparse(a.annotation) for a in arguments):
                    taking.append(f"{name}.{node.name}")
    assert 0 < len(taking) <= MAX_TAKING_RUN_CONFIG, sorted(taking)


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
        if name != "kerastl.cli.main":
            assert not _imports(path, inside_functions=True), name


def test_no_private_keras_or_kerastuner_api_outside_its_wrapper():
    for name, path in _modules().items():
        if name != "kerastl.tune.internals":
            text = path.read_text()
            assert "keras.src" not in text and "keras_tuner.src" not in text, name
            assert "_populate_initial_space" not in text, name


@pytest.mark.parametrize("module", LIGHT)
def test_importing_does_not_import_tensorflow(module):
    code = (f"import sys, {module}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'keras_tuner'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_public_names_resolve_on_first_use():
    assert kerastl.__version__ == importlib.metadata.version("kerastl")
    assert "run_search" in kerastl.__all__ and callable(kerastl.run_search)
    assert all(getattr(kerastl, name) is not None for name in kerastl.__all__)
