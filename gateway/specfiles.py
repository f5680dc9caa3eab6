"""Where the protocol's files (AsyncAPI document, JSON Schemas) are, installed or in a checkout."""

from __future__ import annotations

from pathlib import Path

import gateway


def spec_root() -> Path:
    """The `spec/` directory: the wheel's bundled copy if installed, else the checkout's."""
    package_dir = Path(gateway.__file__).parent
    bundled = package_dir / "_spec"
    if bundled.is_dir():
        return bundled
    return package_dir.parent / "spec"
