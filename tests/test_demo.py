"""The README's first command: the demo runs end to end and reports nothing lost."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from gateway import cli
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


def test_an_unusable_data_dir_stops_the_demo_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    data_dir = tmp_path / "file" / "demo"
    assert cli.main(["demo", "--data-dir", str(data_dir)]) == 2
    assert capsys.readouterr().err == (
        f"agent-gateway: cannot use --data-dir {data_dir}: {os.strerror(errno.ENOTDIR)}\n"
    )
