"""Run a module as `python -m` does, its heap traced: `python -m bench.traced DIR MODULE ARGS`.

tracemalloc starts before the module is imported, and every SIGUSR1 writes a snapshot to
`DIR/heap-N.snapshot` (N counting from 0), then `DIR/heap-N.done` once the file is complete, so
`bench.heap` can compare the heap before and after the connections it opens.
"""

from __future__ import annotations

import runpy
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

FRAMES = 16  # deep enough to reach, from any allocation, the library call that caused it


def main() -> None:
    """Trace, arm the signal, and hand over to the module."""
    directory, module, *args = sys.argv[1:]
    taken = [0]

    def snapshot(signum: int, frame: FrameType | None) -> None:
        path = Path(directory) / f"heap-{taken[0]}.snapshot"
        tracemalloc.take_snapshot().dump(str(path))
        path.with_suffix(".done").touch()
        taken[0] += 1

    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR1, snapshot)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
