"""Log output for operators: `--log-format json` gives one parseable object per record."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from gateway import cli
from gateway.logs import JsonFormatter


def _record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("the store is closed")
        except RuntimeError:
            exc_info = sys.exc_info()
    return logging.LogRecord(
        "agent_gateway.service", logging.ERROR, __file__, 1, message, args, exc_info
    )


def test_a_json_record_carries_time_level_logger_and_the_formatted_message() -> None:
    line = JsonFormatter().format(_record("session %s of run %s: %s", "ses_1", "run_1", "leased"))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["level"] == "ERROR" and entry["logger"] == "agent_gateway.service"
    assert entry["message"] == "session ses_1 of run run_1: leased"
    assert entry["time"].endswith("Z") and "T" in entry["time"]


def test_a_json_record_keeps_its_exception_on_the_same_line() -> None:
    line = JsonFormatter().format(_record("store failed", exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert "RuntimeError: the store is closed" in entry["exception"]


def test_text_no_json_can_encode_still_gives_a_json_line() -> None:
    entry = json.loads(JsonFormatter().format(_record("name %s", "bad\udcffsurrogate")))
    assert entry["message"] == "name bad\udcffsurrogate"


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--log-format", "yaml"], "log format must be one of text, json, not 'yaml'"),
        (["--log-level", "chatty"],
         "log level must be one of debug, info, warning, error, critical, not 'chatty'"),
    ],
)
def test_a_bad_log_setting_stops_the_start_with_one_line(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", *flags]) == 2
    assert capsys.readouterr().err == f"agent-gateway: {says}\n"
