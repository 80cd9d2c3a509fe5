"""Import boundaries (DESIGN §1).

- ``gateway`` never imports ``control_plane`` and vice versa, at any level.
- ``lorry`` (what users import) imports neither at module level; a function-level import (the CLI
  starting a server) is allowed.
- Nothing in ``lorry``, ``gateway`` or ``control_plane`` imports torch, vllm, transformers or peft,
  except the standalone scripts in ``lorry/engine_tools/`` that run only in the engine environment.

Checked statically with ``ast`` (every import statement, relative ones resolved, plus
``importlib.import_module``/``__import__`` with a literal name), then at run time in a clean
interpreter that imports every module and inspects ``sys.modules``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lorry", "gateway", "control_plane")
ENGINE_ONLY = ("torch", "vllm", "transformers", "peft")
ENGINE_TOOLS = "lorry.engine_tools"


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    line: int
    in_function: bool


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        package = current.split(".") if is_package else current.split(".")[:-1]
        if node.level - 1 > len(package) - 1:
            return [f"<relative import beyond top level: {'.' * node.level}{node.module or ''}>"]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, *([node.module] if node.module else [])])
    # `from pkg import sub` may import a submodule: record both.
    return [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]


def imports_of(source: str, current: str, is_package: bool = False) -> list[Import]:
    """Every import in ``source``, with whether it only runs when a function is called."""
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.extend(
                Import(name, node.lineno, in_function) for name in _resolve(node, current, is_package)
            )
        elif isinstance(node, ast.Call):
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            first = node.args[0] if node.args else None
            if (
                name in {"import_module", "__import__"}
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                found.append(Import(first.value, node.lineno, in_function))
        nested = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, nested)

    visit(ast.parse(source), False)
    return found


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def violations(path: Path, source: str, current: str) -> list[str]:
    problems = []
    owner = _top(current)
    for imp in imports_of(source, current, is_package=path.name == "__init__.py"):
        target = _top(imp.module)
        where = f"{path}:{imp.line} imports {imp.module}"
        if imp.module.startswith("<"):
            problems.append(where)
        if owner == "gateway" and target == "control_plane":
            problems.append(where)
        if owner == "control_plane" and target == "gateway":
            problems.append(where)
        if owner == "lorry" and target in {"gateway", "control_plane"} and not imp.in_function:
            problems.append(f"{where} at module level")
        in_engine_tools = current == ENGINE_TOOLS or current.startswith(ENGINE_TOOLS + ".")
        if (target in ENGINE_ONLY or imp.module.startswith("safetensors.torch")) and not in_engine_tools:
            problems.append(where)
    return problems


def source_files() -> list[Path]:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    return [p for p in files if "__pycache__" not in p.parts]


def test_the_packages_exist_and_are_scanned() -> None:
    files = source_files()
    for package in PACKAGES:
        assert ROOT / package / "__init__.py" in files
    assert len(files) > 20


def test_import_boundaries_hold_statically() -> None:
    problems = [
        problem
        for path in source_files()
        for problem in violations(path, path.read_text(), module_name(path))
    ]
    assert problems == []


@pytest.mark.parametrize(
    ("path", "source", "bad"),
    [
        ("gateway/app.py", "import control_plane.app", True),
        ("gateway/app.py", "from control_plane import app", True),
        ("gateway/app.py", "from ..control_plane import app", True),
        ("gateway/sub/mod.py", "from ...control_plane.auth import x", True),
        ("gateway/app.py", "def f():\n    import control_plane", True),
        ("gateway/app.py", "import importlib\nimportlib.import_module('control_plane.app')", True),
        ("gateway/app.py", "from . import routing\nfrom lorry import keys", False),
        ("control_plane/app.py", "from gateway.cache import Cache", True),
        ("control_plane/deployments/service.py", "from ...gateway import cache", True),
        ("control_plane/deployments/service.py", "from ..engines import catalog", False),
        ("lorry/cli.py", "import gateway", True),
        ("lorry/cli.py", "from control_plane.app import create_app", True),
        ("lorry/cli.py", "if True:\n    from control_plane.app import create_app", True),
        ("lorry/cli.py", "class C:\n    from gateway import app", True),
        ("lorry/cli.py", "def serve():\n    from control_plane.app import create_app", False),
        ("lorry/cli.py", "async def serve():\n    import gateway.app", False),
        ("lorry/cli.py", "from . import keys", False),
        ("lorry/client.py", "import torch", True),
        ("lorry/client.py", "def f():\n    import vllm.entrypoints", True),
        ("control_plane/jobs/validate.py", "from transformers import AutoConfig", True),
        ("control_plane/jobs/validate.py", "import peft", True),
        ("gateway/app.py", "__import__('torch')", True),
        ("control_plane/jobs/validate.py", "from safetensors.torch import load_file", True),
        ("control_plane/jobs/validate.py", "from safetensors.numpy import load_file\nimport torchy", False),
        ("lorry/engine_tools/demo_model.py", "import torch\nfrom peft import LoraConfig", False),
        ("lorry/engine_tools/__init__.py", "from transformers import AutoConfig", False),
    ],
)
def test_the_checker_catches_what_it_must(path: str, source: str, bad: bool) -> None:
    found = violations(Path(path), source, module_name(ROOT / path))
    assert bool(found) is bad, found


_PROBE = """
import importlib, json, pkgutil, sys
package = sys.argv[1]
root = importlib.import_module(package)
for info in pkgutil.walk_packages(root.__path__, package + "."):
    if info.name == "lorry.engine_tools" or info.name.startswith("lorry.engine_tools."):
        continue
    importlib.import_module(info.name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("lorry", {"gateway", "control_plane", *ENGINE_ONLY}),
        ("gateway", {"control_plane", *ENGINE_ONLY}),
        ("control_plane", {"gateway", *ENGINE_ONLY}),
    ],
)
def test_importing_every_module_loads_nothing_forbidden(package: str, forbidden: set[str]) -> None:
    """Transitive imports too: a clean interpreter imports every module of the package."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, package], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert package in loaded
    assert loaded & forbidden == set()
