"""Test, lint, type-check and bench sessions: `nox` runs the default ones, `nox -l` lists all."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import nox
from packaging.requirements import Requirement

ROOT = Path(__file__).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PYTHONS = ["3.11", "3.12", "3.13"]

nox.needs_version = ">=2025.5.1"
# The newest dependencies on the newer interpreters, the lowest ones pyproject allows on the lowest
# interpreter: both ends of what we claim, in one pass of the suite per interpreter.
nox.options.sessions = ["tests-3.12", "tests-3.13", "lowest", "lint", "typecheck", "bench_smoke"]
# uv when `nox[uv]` is installed (much faster), else plain virtualenv + pip.
nox.options.default_venv_backend = "uv|virtualenv"
# A machine without one of the interpreters skips that session instead of failing the run (nox
# would otherwise fail under CI=true), and never fetches interpreters from outside PyPI.
nox.options.error_on_missing_interpreters = False
nox.options.download_python = "never"


def _pyenv_interpreter_dirs() -> list[str]:
    """Bin dirs of pyenv's newest 3.11/3.12/3.13, which its shims only expose when activated."""
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    dirs = []
    for minor in PYTHONS:
        pattern = re.compile(rf"{re.escape(minor)}\.(\d+)")
        found = [
            (int(match.group(1)), path / "bin")
            for path in (versions.iterdir() if versions.is_dir() else [])
            if (match := pattern.fullmatch(path.name)) and (path / "bin").is_dir()
        ]
        if found:
            dirs.append(str(max(found)[1]))
    return dirs


os.environ["PATH"] = os.pathsep.join([*_pyenv_interpreter_dirs(), os.environ.get("PATH", "")])


def _dev_requirement(name: str) -> str:
    """The dev extra's requirement for one tool, so a session pins it where pyproject does."""
    for spec in PYPROJECT["project"]["optional-dependencies"]["dev"]:
        if Requirement(spec).name == name:
            return str(spec)
    raise LookupError(f"{name} is not in the dev extra of pyproject.toml")


def _lowest_constraints() -> list[str]:
    """`name==lower-bound` for every runtime dependency: the oldest set we claim to support."""
    lines = []
    for spec in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(spec)
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        if len(lower) != 1:
            raise ValueError(f"runtime dependency {spec!r} needs exactly one >= lower bound")
        lines.append(f"{requirement.name}=={lower[0]}")
    return lines


# Shows in the log which versions the lowest session really tested.
_PRINT_VERSIONS = """
import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    print(name, version(name))
"""


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite against the installed (not editable) package, as users get it."""
    # The bench extra too: tests/test_bench_smoke.py renders the report, chart included.
    session.install(".[dev,bench]")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lowest(session: nox.Session) -> None:
    """Run the test suite on the lowest versions pyproject allows, so the lower bounds stay true."""
    constraints = Path(session.create_tmp()) / "lowest-constraints.txt"
    constraints.write_text("\n".join(_lowest_constraints()) + "\n", encoding="utf-8")
    session.install("-c", str(constraints), ".[dev,bench]")
    names = [line.split("==")[0] for line in _lowest_constraints()]
    session.run("python", "-c", _PRINT_VERSIONS, *names)
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """Run ruff's checks (formatting is not enforced)."""
    session.install(_dev_requirement("ruff"))
    session.run("ruff", "check", *session.posargs)


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """Run mypy --strict over the packages, tests, benchmarks and this file (paths in pyproject)."""
    session.install(".[dev,bench]")
    session.run("mypy", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run the benchmarks (`nox -s bench -- --help` for their options)."""
    session.install(".[dev,bench]")
    session.run("python", "-m", "bench", *session.posargs)


@nox.session(python="3.11")
def bench_smoke(session: nox.Session) -> None:
    """Run every bench phase at toy sizes (under a minute), so a broken suite is caught early."""
    session.install(".[dev,bench]")
    session.run("python", "-m", "bench", "--smoke", *session.posargs)


@nox.session(python="3.11")
def reliability(session: nox.Session) -> None:
    """Run the fault and hostile-input tests with their long variants; rewrites reliability.md."""
    session.install(".[dev]")
    files = sorted(
        str(path.relative_to(ROOT))
        for pattern in ("test_fault_*.py", "test_hostile_*.py", "test_control_fuzz.py",
                        "test_secrets_never_leak.py")
        for path in (ROOT / "tests").glob(pattern)
    )
    # An explicit marker expression, so the long variants run whatever the default selection is.
    session.run("pytest", "-m", "slow or not slow", *files, *session.posargs)
