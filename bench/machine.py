"""What the figures were measured on: they mean little without the box and the versions."""

from __future__ import annotations

import os
import platform
import ssl
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def describe(nofile: int) -> dict[str, Any]:
    """Cores, CPU, memory, OS, the interpreter and the transport stack's versions."""
    return {
        "cores": os.cpu_count() or 1,
        "cpu": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "trio": _version("trio"),
        "trio_websocket": _version("trio-websocket"),
        "wsproto": _version("wsproto"),
        "openssl": ssl.OPENSSL_VERSION,
        "orjson": _version("orjson"),
        "nofile_limit": nofile,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
