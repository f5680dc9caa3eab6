"""The core stays pure: no I/O, no clock, no randomness, no logging, no shell.

Two checks, because each misses what the other sees: importing every module of the package in a
fresh interpreter must not load an I/O or async library (catches indirect imports), and a scan of
the source refuses imports of such modules and calls that read a clock or draw random numbers
(catches what is imported lazily, inside a function, or only on some path).

What attrs itself loads was checked when this test was written: `threading` (for its locks) and
nothing on the list below, so the list is asserted on the whole interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "statemachine"
MODULES = sorted(
    "statemachine" if path.stem == "__init__" else f"statemachine.{path.stem}"
    for path in PACKAGE.glob("*.py")
)

# Must never be loaded by importing the core.
NOT_LOADED = ("trio", "trio_websocket", "sqlite3", "socket", "asyncio", "logging", "random",
              "gateway")

# Must never be imported by the core's source (top-level names).
NO_IMPORT = frozenset({
    "asyncio", "concurrent", "datetime", "gateway", "http", "io", "logging", "multiprocessing",
    "os", "random", "secrets", "select", "selectors", "shutil", "signal", "socket", "sqlite3",
    "ssl", "subprocess", "tempfile", "threading", "time", "trio", "trio_websocket", "urllib",
    "uuid",
})
# The docs generator writes a file and prints: it may use these; the rest of the core may not.
DIAGRAM_ONLY = frozenset({"pathlib", "sys"})
NO_CALL = frozenset({
    "time.time", "time.time_ns", "time.monotonic", "time.monotonic_ns", "time.perf_counter",
    "time.sleep", "datetime.now", "datetime.utcnow", "datetime.today", "date.today",
    "uuid.uuid1", "uuid.uuid4", "os.urandom", "os.getenv", "open", "input", "breakpoint",
})
NO_CALL_PREFIXES = ("random.", "secrets.", "os.environ")
DIAGRAM_CALLS = frozenset({"open", "print"})


def loaded_after_import(modules: list[str]) -> dict[str, list[str]]:
    """Import `modules` in a fresh interpreter; report what was loaded before and after."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "before = sorted(sys.modules)\n"
        f"import {', '.join(modules)}\n"
        "print(json.dumps({'before': before, 'after': sorted(sys.modules)}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    result: dict[str, list[str]] = json.loads(done.stdout)
    return result


def test_importing_every_core_module_loads_no_io_or_async_library() -> None:
    assert "statemachine.hub" in MODULES and "statemachine.diagram" in MODULES
    loaded = loaded_after_import(MODULES)
    assert set(MODULES) <= set(loaded["after"])
    found = [m for m in loaded["after"] if m.split(".")[0] in NOT_LOADED]
    already = [m for m in loaded["before"] if m.split(".")[0] in NOT_LOADED]
    assert found == [], f"importing the core loaded {found} (the bare interpreter had {already})"


def test_the_runtime_core_does_not_load_the_docs_generator() -> None:
    loaded = loaded_after_import(["statemachine", "statemachine.hub"])
    assert "statemachine.diagram" not in loaded["after"]
    assert "pathlib" not in set(loaded["after"]) - set(loaded["before"])


def dotted(node: ast.expr) -> str | None:
    """`a.b.c` for a name or attribute chain, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def violations(source: str, diagram: bool = False) -> list[str]:
    """Forbidden imports and calls in one module's source."""
    banned_imports = NO_IMPORT if diagram else NO_IMPORT | DIAGRAM_ONLY
    banned_calls = NO_CALL - DIAGRAM_CALLS if diagram else NO_CALL | {"print"}
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [f"import {n}" for n in names if n.split(".")[0] in banned_imports]
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name is not None and (
                name in banned_calls
                or any(name.endswith(f".{call}") for call in banned_calls if "." in call)
                or name.startswith(NO_CALL_PREFIXES)
            ):
                found.append(f"call {name}()")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_the_source_imports_and_calls_nothing_impure(path: Path) -> None:
    found = violations(path.read_text(encoding="utf-8"), diagram=path.name == "diagram.py")
    assert found == [], f"{path.name}: {found}"


@pytest.mark.parametrize(
    "snippet",
    [
        "import time",
        "import os.path",
        "from datetime import datetime",
        "from gateway.store import base",
        "import trio",
        "import logging",
        "import pathlib",
        "def f():\n    import random",
        "x = time.monotonic()",
        "x = datetime.datetime.now()",
        "x = uuid.uuid4()",
        "x = random.random()",
        "x = secrets.token_hex()",
        "x = open('f')",
        "print('x')",
        "x = os.environ.get('X')",
    ],
)
def test_the_scan_catches_what_it_refuses(snippet: str) -> None:
    assert violations(snippet) != []


def test_the_scan_lets_the_docs_generator_write_and_print() -> None:
    assert violations("import sys\nfrom pathlib import Path\nprint(1)", diagram=True) == []
    assert violations("import time", diagram=True) != []
