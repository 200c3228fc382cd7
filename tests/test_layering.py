"""The imports say the layering: every import of a relex module points down, nothing imports a private name of
another module, and no import inside a function dodges a cycle.

The modules of the streaming engine are ordered in ``LAYERS`` (lowest first); a module may import modules of
its own layer or below. Modules not listed (commands, evaluation, integrations, the toy run) sit above all of
them. Imports inside functions count like any other (so none can hide a cycle); in the engine's modules each
must say on its line or the line above why it is deferred: start-up time of the command line, or an optional
dependency. A package ``__init__`` may re-export a higher module lazily through ``__getattr__`` (a facade,
commented like a deferred import); those re-exports are the only edges left out of the cycle check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "relex"

LAYERS = [
    ["relex", "relex.errors", "relex.device", "relex.jsonable", "relex.fields", "relex.progress", "relex.io.files",
     "relex.io.steps", "relex.io.sizes"],
    ["relex.io.source", "relex.io.reader", "relex.io.hub", "relex.io.fsdp", "relex.io.lora_config",
     "relex.io.lora_factors", "relex.io.lora", "relex.io.writer", "relex.io.lora_writer", "relex.io.staging",
     "relex.io.memory", "relex.io.discover", "relex.io.sources", "relex.io.runs", "relex.io.run_readers",
     "relex.io"],
    ["relex.distributed"],
    ["relex.staging"],
    ["relex.subspace", "relex.regressors.base"],
    ["relex.regressors.*"],
    ["relex.regressors"],
    ["relex.model_spec"],
    ["relex.methods.base"],
    ["relex.methods.*"],
    ["relex.methods"],
    ["relex.backtest"],
    ["relex.trajectory"],
    ["relex.options"],
    ["relex.analysis.outcomes", "relex.analysis.drift", "relex.analysis.nulls", "relex.analysis.tables",
     "relex.analysis.reward", "relex.analysis.wording"],
    ["relex.analysis.verdict", "relex.analysis"],
    ["relex.summaries"],
    ["relex.stream.contract"],
    ["relex.stream.kernels", "relex.stream.pool"],
    ["relex.stream.executor"],
    ["relex.stream"],
    ["relex.sinks"],
    ["relex.run"],
    ["relex.store"],
]
# The engine: these modules' deferred imports must say why they are deferred.
ENGINE = {"relex.device", "relex.distributed", "relex.staging", "relex.stream", "relex.sinks", "relex.run",
          "relex.store", "relex.options", "relex.jsonable", "relex.progress", "relex.subspace", "relex.backtest",
          "relex.trajectory", "relex.io.reader", "relex.io.run_readers", "relex.io.runs", "relex.io.writer",
          "relex.io.staging", "relex.methods", "relex.regressors"}
# What runs a pass: the analysis never imports it (it analyses what a pass gave).
PASS = ("relex.run", "relex.api", "relex.stream", "relex.sinks", "relex.store")
DEFER_REASONS = ("start-up", "optional")
KNOWN_PRIVATE: set = set()  # private names other modules import: none


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(name: str) -> int:
    for i, names in enumerate(LAYERS):
        for pattern in names:
            if name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1])
                                   and name != pattern[:-2]):
                return i
    return len(LAYERS)


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[tuple[str, list[str]]]:
    """(module, imported names) pairs of relex modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names if a.name.split(".")[0] == "relex"]
    base = node.module or ""
    if node.level:
        package = importer if is_package(importer) else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    if base.split(".")[0] != "relex":
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append((sub, []) if sub in MODULES else (base, [alias.name]))
    return out


def imports(name: str):
    """(line, node, is deferred, inside a package __getattr__) of every import statement of a module."""
    tree = ast.parse(MODULES[name].read_text())
    found = []

    def visit(node, deferred: bool, facade: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child.lineno, child, deferred, facade))
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            getattr_facade = inner and is_package(name) and getattr(child, "name", "") == "__getattr__"
            visit(child, deferred or inner, facade or getattr_facade)

    visit(tree, False, False)
    return found


def edges(include_facades: bool = False):
    """importer -> imported relex modules (a module's parent packages are loaded with it)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for _, node, _, facade in imports(name):
            if facade and not include_facades:
                continue
            for target, _ in resolve(name, node):
                while target and target != name:
                    if target in MODULES and not name.startswith(target + "."):
                        graph[name].add(target)
                    target = target.rpartition(".")[0]
    return graph


def test_every_import_points_down():
    wrong = []
    for name in MODULES:
        for line, node, _, facade in imports(name):
            if facade:
                continue
            for target, _ in resolve(name, node):
                if target in MODULES and layer(target) > layer(name):
                    wrong.append(f"{name}:{line} imports {target} (a higher layer)")
    assert not wrong, "\n".join(wrong)


# What the io layer must never import: coordination across processes, the pass and its sinks, the commands
# built on them.
ABOVE_IO = ("relex.distributed", "relex.staging", "relex.stream", "relex.sinks", "relex.engine", "relex.store")


def test_io_imports_no_coordination_or_pass_code():
    io_layer = layer("relex.io")
    wrong = []
    for name in (n for n in MODULES if n == "relex.io" or n.startswith("relex.io.")):
        for line, node, _, _ in imports(name):
            for target, _ in resolve(name, node):
                if (any(target == m or target.startswith(m + ".") for m in ABOVE_IO)
                        or (target in MODULES and layer(target) > io_layer)):
                    wrong.append(f"{name}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_no_module_imports_another_modules_private_names():
    found = []
    for name in MODULES:
        for line, node, _, _ in imports(name):
            for target, names in resolve(name, node):
                for imported in names:
                    if imported.startswith("_") and not imported.startswith("__") and target != name:
                        if (name, target, imported) not in KNOWN_PRIVATE:
                            found.append(f"{name}:{line} imports {target}.{imported}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if any(n == e or n.startswith(e + ".") for e in ENGINE)))
def test_engine_modules_say_why_an_import_is_deferred(name):
    lines = MODULES[name].read_text().splitlines()
    unexplained = []
    for line, node, deferred, _ in imports(name):
        if not deferred:
            continue
        text = " ".join(lines[max(0, line - 2): line]).lower()
        if not any(reason in text for reason in DEFER_REASONS):
            unexplained.append(f"{name}:{line}: {lines[line - 1].strip()}")
    assert not unexplained, "deferred imports need a comment saying why (start-up or optional):\n" + "\n".join(unexplained)


def relex_imports(prefix: str):
    """(importer:line, imported module) of every relex import of ``prefix`` and the modules under it."""
    for name in MODULES:
        if name == prefix or name.startswith(prefix + "."):
            for line, node, _, _ in imports(name):
                for target, _ in resolve(name, node):
                    yield f"{name}:{line}", target


def test_the_pass_knows_the_method_interface_not_a_method():
    """The pass imports no concrete method (``relex.methods.<name>``): what a method needs of it comes through
    the interface of :mod:`relex.methods.base` (``Method.factor_accumulator``)."""
    found = [f"{where} imports {target}" for where, target in relex_imports("relex.stream")
             if target.startswith("relex.methods.") and target != "relex.methods.base"]
    assert not found, "\n".join(found)


def test_the_run_readers_know_only_the_inputs():
    """Reading a run's tensors as rows needs the sources (``relex.io``), errors and dtypes: no pass, sink,
    engine, nor the processes of a distributed run."""
    allowed = ("relex.io", "relex.errors", "relex.device")
    found = [f"{where} imports {target}" for where, target in relex_imports("relex.io.run_readers")
             if not any(target == a or target.startswith(a + ".") for a in allowed)]
    assert not found, "\n".join(found)


def test_the_analysis_never_imports_the_engine():
    """The analysis works on what a pass gave (Gram matrices, the verdict); it never runs one itself."""
    found = [f"{where} imports {target}" for where, target in relex_imports("relex.analysis")
             if any(target == e or target.startswith(e + ".") for e in PASS)]
    assert not found, "\n".join(found)


def test_the_library_never_imports_the_command_line():
    """The command line (relex_cli) calls the library; nothing of the library imports it back."""
    found = []
    for name in MODULES:
        tree = ast.parse(MODULES[name].read_text())
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and getattr(
                    node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "run_module", "__import__"):
                modules.append(str(node.args[0].value))  # importlib / runpy by name count too
            found += [f"{name}:{node.lineno} imports {m}" for m in modules if m.split(".")[0] == "relex_cli"]
    assert not found, "\n".join(found)


# The command line (cli/, installed as relex_cli) is held to the same rule as the library.
CLI_ROOT = ROOT.parent / "cli"
PROJECT_FILES = {**MODULES, **{"relex_cli" + ("." + ".".join(p.relative_to(CLI_ROOT).with_suffix("").parts)
                                              if p.name != "__init__.py" else ""): p
                               for p in sorted(CLI_ROOT.rglob("*.py"))}}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_reaches_into_another_modules_private_names():
    """Neither ``from m import _x`` nor ``m._x`` (``m`` an imported module of relex or relex_cli), across the
    library and the command line."""
    found = []
    for name, path in PROJECT_FILES.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}  # local name -> the project module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in ("relex", "relex_cli"):
                        aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                            alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in (
                    "relex", "relex_cli"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in PROJECT_FILES:
                        aliases[alias.asname or alias.name] = full
                    elif _is_private(alias.name) and node.module != name:
                        found.append(f"{name}:{node.lineno} imports {full}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                chain, base = [], node.value
                while isinstance(base, ast.Attribute):
                    chain.insert(0, base.attr)
                    base = base.value
                if isinstance(base, ast.Name) and base.id in aliases:
                    owner = ".".join([aliases[base.id], *chain])
                    if owner != name:
                        found.append(f"{name}:{node.lineno} uses {owner}.{node.attr}")
    assert not found, "\n".join(found)
