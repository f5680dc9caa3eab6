"""Render the transition table as a Mermaid state diagram, so the docs can never drift from code.

`python -m statemachine.diagram` prints it; `--write` refreshes docs/state-diagram.md, which the
README links and a test compares against a fresh rendering.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from statemachine.records import SessionState
from statemachine.table import TRANSITIONS, Action

DOC = Path(__file__).resolve().parent.parent / "docs" / "state-diagram.md"


def mermaid() -> str:
    """The table's state changes as Mermaid `stateDiagram-v2` text (self-loops are left out)."""
    edges: dict[tuple[SessionState, SessionState], list[str]] = defaultdict(list)
    for (state, trigger), transition in TRANSITIONS.items():
        if transition.target is not state and transition.action is not Action.IGNORE:
            edges[state, transition.target].append(f"{trigger.value} / {transition.action.value}")
    lines = ["stateDiagram-v2", f"    [*] --> {SessionState.DETACHED.name}"]
    for (source, target), labels in edges.items():
        lines.append(f"    {source.name} --> {target.name}: {'<br/>'.join(labels)}")
    return "\n".join(lines) + "\n"


def document() -> str:
    """The whole docs page around the diagram."""
    return (
        "# Session state diagram\n\n"
        "Generated from `statemachine/table.py` by `python -m statemachine.diagram --write`;\n"
        "a test fails when this file is stale. Self-transitions (renew, serve, refusals) are in\n"
        "the table itself.\n\n"
        f"```mermaid\n{mermaid()}```\n"
    )


def main(argv: list[str]) -> int:
    """Print the diagram, or write the docs page with `--write`."""
    if "--write" in argv:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(document(), encoding="utf-8")
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(mermaid())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
