"""File descriptors: every runtime connection holds one, and many systems start with only 1024.

`agent-gateway serve` raises its soft RLIMIT_NOFILE to the hard limit at start, and holds no
more connections than that limit allows: a connection past it would not even be accepted (no
descriptor for it), so the runtime would hang in its handshake instead of getting a 503.
"""

from __future__ import annotations

import contextlib
import resource
from typing import Final

# Descriptors the gateway needs besides its runtime sockets: the store, the listeners, the
# control API's connections and handshakes still being refused.
FD_RESERVE: Final = 128


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        # If the kernel's nr_open is lower, keep what we have: callers report the limit.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def session_capacity(max_sessions: int, nofile: int) -> int:
    """How many runtime connections one process can really hold under `nofile` descriptors."""
    if nofile == resource.RLIM_INFINITY:  # no limit to leave room under (-1 on Linux)
        return max_sessions
    return max(1, min(max_sessions, nofile - FD_RESERVE))
