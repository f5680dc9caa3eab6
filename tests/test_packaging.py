"""What a user installs: the wheel carries the spec and the console script, the sdist the rest.

The build backend is called directly (no pip, no network), on the checkout these tests sit in.
"""

import configparser
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "spec"
# Named outright so an empty or missing spec/ cannot make the whole-tree checks pass vacuously.
KEY_SPEC_FILES = (
    "v1/api/runtime-session.asyncapi.yaml",
    "v1/schemas/commands/runtime-session.json",
)
# Build artefacts .gitignore keeps out of both archives.
IGNORED_SUFFIXES = (".pyc", ".tmp")


def _build(kind: str, out_dir: Path) -> Path:
    """Run hatchling's PEP 517 hook for `kind` (wheel or sdist) and return the built file."""
    hook = f"build_{kind}"
    script = f"import sys; from hatchling.build import {hook}; print({hook}(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", script, str(out_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return out_dir / done.stdout.strip().splitlines()[-1]


def _source_files(top: str) -> list[str]:
    """Files under a top-level source dir, as repo-relative posix paths (caches left out)."""
    base = ROOT / top
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in base.rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and path.suffix not in IGNORED_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(base).parts)
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    with zipfile.ZipFile(_build("wheel", tmp_path_factory.mktemp("wheel"))) as built:
        yield built


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    with tarfile.open(_build("sdist", tmp_path_factory.mktemp("sdist"))) as built:
        # Members are "<name>-<version>/<path>"; drop the prefix.
        return {name.split("/", 1)[1] for name in built.getnames() if "/" in name}


def test_wheel_ships_the_spec_inside_the_gateway_package(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for key in KEY_SPEC_FILES:
        assert f"gateway/_spec/{key}" in names
    for source in _source_files("spec"):
        assert "gateway/_spec/" + source.removeprefix("spec/") in names
    assert not any(name.startswith("spec/") for name in names)


def test_wheel_holds_both_packages_and_no_tests(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for package in ("gateway", "statemachine"):
        for source in _source_files(package):
            if source.endswith(".py"):
                assert source in names
    assert "gateway/cli.py" in names
    assert "statemachine/__init__.py" in names
    assert not any(name.startswith(("tests/", "bench/", "docs/")) for name in names)


def test_wheel_declares_the_console_script(wheel: zipfile.ZipFile) -> None:
    [entry_points] = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    assert parser["console_scripts"]["agent-gateway"] == "gateway.cli:main"


def test_wheel_metadata_names_the_project(wheel: zipfile.ZipFile) -> None:
    [metadata] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    text = wheel.read(metadata).decode()
    assert "Name: agent-gateway\n" in text
    assert "Requires-Python: >=3.11\n" in text
    assert "License-Expression: Apache-2.0\n" in text


def test_sdist_carries_spec_tests_bench_and_docs(sdist_names: set[str]) -> None:
    for key in KEY_SPEC_FILES:
        assert f"spec/{key}" in sdist_names
    assert "tests/test_packaging.py" in sdist_names
    assert "pyproject.toml" in sdist_names
    for top in ("spec", "tests", "bench", "docs", "gateway", "statemachine"):
        for source in _source_files(top):
            assert source in sdist_names, f"{source} is missing from the sdist"
