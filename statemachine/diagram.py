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

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "state-diagram.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- state-diagram:begin -->", "<!-- state-diagram:end -->"


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


def readme_with_diagram(readme: str) -> str:
    """The README with the diagram between its markers replaced by a fresh rendering."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + f"\n```mermaid\n{mermaid()}```\n" + readme[end:]


def main(argv: list[str]) -> int:
    """Print the diagram, or write the docs page and the README's copy with `--write`."""
    if "--write" in argv:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(document(), encoding="utf-8")
        README.write_text(readme_with_diagram(README.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"wrote {DOC} and the diagram in {README}")
    else:
        sys.stdout.write(mermaid())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
