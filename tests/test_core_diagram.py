"""The state diagram in the docs and the README is the one the transition table renders today."""

from __future__ import annotations

from pathlib import Path

from statemachine import diagram
from statemachine.records import SessionState
from statemachine.table import TRANSITIONS, Action

REFRESH = "stale state diagram; refresh it with: python -m statemachine.diagram --write"
# The checkout's files, wherever `statemachine` was imported from: under nox it is the installed
# package, whose directory holds no docs (diagram.DOC would point into site-packages).
CHECKOUT = Path(__file__).resolve().parent.parent


def test_the_docs_page_is_fresh() -> None:
    page = CHECKOUT / "docs" / "state-diagram.md"
    assert page.read_text(encoding="utf-8") == diagram.document(), REFRESH


def test_the_readme_copy_is_fresh() -> None:
    readme = (CHECKOUT / "README.md").read_text(encoding="utf-8")
    assert diagram.BEGIN in readme and diagram.END in readme
    assert diagram.readme_with_diagram(readme) == readme, REFRESH


def test_the_diagram_shows_every_state_change_of_the_table() -> None:
    text = diagram.mermaid()
    for (state, trigger), transition in TRANSITIONS.items():
        if transition.target is not state and transition.action is not Action.IGNORE:
            edge = f"{state.name} --> {transition.target.name}: "
            line = next(line for line in text.splitlines() if edge in line)
            assert f"{trigger.value} / {transition.action.value}" in line
    assert all(state.name in text for state in SessionState)
