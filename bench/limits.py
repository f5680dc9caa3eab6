"""File-descriptor limits: every held session costs one socket on each side."""

from __future__ import annotations

import contextlib
import resource


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        # If the kernel's nr_open is lower, keep what we have: the report shows the limit.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
