"""The README's first command: the demo runs end to end and reports nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.demo import run_demo


async def test_demo_tells_the_whole_story_and_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_demo(tmp_path) == 0
    story = capsys.readouterr().out
    for transition in (
        "detached -> attached",
        "attached -> leased",
        "leased -> expired",
        "expired -> recovering",
        "recovering -> leased",
    ):
        assert transition in story
    assert "nothing lost" in story
    assert "sk-demo-0123456789" not in story
