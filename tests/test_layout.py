"""The package layout: one sub-package per stage, imports pointing down the data path only.

Every module's imports are read from its syntax tree (nothing is imported), those
inside functions included, so a lazy import cannot hide a cycle or an upward edge.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cnnpipe"

# The stages in data-path order; a module may import its own stage and those before it.
STAGES = ("images", "datasets", "models", "training", "runs", "inspect")
# importable by every stage; they import no stage
FOUNDATION = ("config", "config_errors", "config_normalize", "files", "fdcapture", "tasks")
TOP = ("cli", "backbones", "__init__")         # may import every stage (backbones: the public facade)
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The cnnpipe modules a `from ... import ...` names (a submodule if the name is one)."""
    if node.level:
        base = module.split(".")
        base = base[:len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("cnnpipe"):
        return []
    names = [f"{target}.{alias.name}" for alias in node.names]
    return [n for n in names if n in MODULES] or [target]


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            out.update(_resolve(node, module, path.name == "__init__.py"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("cnnpipe"))
    out.discard(module)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def stage_of(module: str) -> int:
    """-1 for foundation modules, the stage's index, or len(STAGES) for the top."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in TOP:
        return len(STAGES)
    if parts[1] in FOUNDATION:
        return -1
    return STAGES.index(parts[1])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colours)."""
    colour = dict.fromkeys(graph, 0)
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        colour[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if colour.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if colour.get(n) == 0 and (found := visit(n)):
                return found
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(graph):
        if colour[m] == 0 and (found := visit(m)):
            return found
    return None


def test_every_stage_and_foundation_module_exists():
    for stage in STAGES:
        assert f"cnnpipe.{stage}" in MODULES, f"missing sub-package cnnpipe/{stage}/"
    tops = {m.split(".")[1] for m in MODULES if m.count(".") == 1}
    assert tops == set(STAGES) | set(FOUNDATION) | {"cli", "backbones"}, "a new top-level module: put it in its stage's package"


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH) or [])


def test_imports_point_down_the_data_path():
    upward = [f"{m} -> {n}" for m, deps in GRAPH.items() for n in deps
              if n in MODULES and n != "cnnpipe" and stage_of(n) > stage_of(m)]
    assert not upward, "imports pointing up the stage order:\n" + "\n".join(sorted(upward))


def test_foundation_modules_import_no_stage():
    for name in FOUNDATION:   # config's schema and its error messages are two foundation modules
        staged = {n for n in GRAPH[f"cnnpipe.{name}"] if stage_of(n) >= 0}
        assert not staged, f"cnnpipe.{name} imports {staged}"


@pytest.mark.parametrize("stage", STAGES)
def test_package_docstring_states_what_it_may_import(stage):
    doc = ast.get_docstring(ast.parse(MODULES[f"cnnpipe.{stage}"].read_text(encoding="utf-8"))) or ""
    found = re.search(r"May import: (.*?)(?:\n\n|$)", doc, re.S)
    assert found, f"cnnpipe/{stage}/__init__.py: no 'May import:' paragraph"
    said = re.findall(r"\b(" + "|".join(STAGES) + r")\b", found.group(1))
    assert said == list(STAGES[:STAGES.index(stage)]), f"cnnpipe/{stage}: docstring says {said}"
    # the __init__ imports nothing, so one module never drags in its siblings (or jax)
    assert not GRAPH[f"cnnpipe.{stage}"]


def test_functions_and_modules_stay_readable():
    long_functions, long_modules = [], []
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{module}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{module}.{node.name}: {n} lines")
    assert not long_modules and not long_functions, long_modules + long_functions


def test_the_checker_finds_cycles_and_upward_edges():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert stage_of("cnnpipe.images.decode") < stage_of("cnnpipe.training.train") < stage_of("cnnpipe.cli")
    assert stage_of("cnnpipe.files") < stage_of("cnnpipe.images.decode")


def test_public_api_resolves_without_importing_jax():
    code = ("import sys, cnnpipe\n"
            "names = ['read_image', 'Planes', 'DecodeError', '__version__']\n"
            "assert all(hasattr(cnnpipe, n) for n in names)\n"
            "assert 'jax' not in sys.modules, 'import cnnpipe pulled in jax'\n"
            "for n in ['load_config', 'load_store', 'build_model', 'train_and_evaluate', 'preprocess']:\n"
            "    assert callable(getattr(cnnpipe, n)), n\n")
    subprocess.run([sys.executable, "-c", code], check=True)
