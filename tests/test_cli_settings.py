"""What the operator types: a bad setting stops the start with one line naming what to change."""

from __future__ import annotations

import pytest

from gateway import cli
from gateway.config import SettingError, Settings


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("port", 70000, "port must be an integer from 0 to 65535, not 70000"),
        ("port", -1, "port must be an integer from 0 to 65535, not -1"),
        ("control_port", 65536, "control_port must be an integer from 0 to 65535, not 65536"),
        ("heartbeat_interval_ms", 10, "heartbeat_interval_ms must be >= 1000, not 10"),
        ("command_rate", -1.0, "command_rate must be >= 0.001, not -1.0"),
        ("send_timeout_s", 0.0, "send_timeout_s must be > 0, not 0.0"),
        ("send_timeout_s", float("nan"), "send_timeout_s must be a finite number, not nan"),
        ("command_rate", float("inf"), "command_rate must be a finite number, not inf"),
        ("store_sync", "fast", "store_sync must be one of full, normal, not 'fast'"),
    ],
)
def test_settings_refuse_a_value_naming_the_rule_it_breaks(
    setting: str, value: object, says: str
) -> None:
    with pytest.raises(SettingError) as refused:
        Settings(**{setting: value})  # type: ignore[arg-type]
    assert str(refused.value) == says
    assert refused.value.name == setting


@pytest.mark.parametrize("port", [0, 65535])
def test_both_ends_of_the_port_range_are_accepted(port: int) -> None:
    assert Settings(port=port, control_port=port).port == port


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--port", "abc"], "--port must be an integer, not 'abc'"),
        (["--port", "70000"], "--port must be an integer from 0 to 65535, not 70000"),
        (["--control-port", "65537"],
         "--control-port must be an integer from 0 to 65535, not 65537"),
        (["--heartbeat-interval-ms", "10"], "--heartbeat-interval-ms must be >= 1000, not 10"),
        (["--max-frame-bytes", "100"], "--max-frame-bytes must be >= 4096, not 100"),
        (["--command-rate", "-1"], "--command-rate must be >= 0.001, not -1"),
        (["--command-burst", "lots"], "--command-burst must be a number, not 'lots'"),
        (["--send-timeout-s", "nan"], "--send-timeout-s must be a finite number, not nan"),
        (["--store-sync", "fast"], "--store-sync must be one of full, normal, not 'fast'"),
    ],
)
def test_a_bad_flag_value_stops_the_start_with_one_line_naming_the_flag(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", *flags]) == 2
    assert capsys.readouterr().err == f"agent-gateway: {says}\n"


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("PORT", "abc", "AGENT_GATEWAY_PORT must be an integer, not 'abc'"),
        ("HEARTBEAT_INTERVAL_MS", "10",
         "AGENT_GATEWAY_HEARTBEAT_INTERVAL_MS must be >= 1000, not 10"),
        ("STORE_SYNC", "fast", "AGENT_GATEWAY_STORE_SYNC must be one of full, normal, not 'fast'"),
    ],
)
def test_a_bad_environment_value_is_refused_naming_the_variable(
    variable: str, value: str, says: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AGENT_GATEWAY_" + variable, value)
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err == f"agent-gateway: {says}\n"


def test_a_flag_overrides_its_variable_and_is_the_one_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AGENT_GATEWAY_PORT", "abc")
    assert cli.main(["serve", "--port", "70000"]) == 2
    assert capsys.readouterr().err == (
        "agent-gateway: --port must be an integer from 0 to 65535, not 70000\n"
    )


@pytest.mark.parametrize(
    ("text", "on"),
    [("1", True), ("true", True), (" Yes ", True), ("ON", True),
     ("0", False), ("False", False), ("no", False), (" off\n", False)],
)
def test_a_switch_variable_takes_each_true_and_false_spelling(
    text: str, on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_GATEWAY_MASK_SECRETS", text)
    monkeypatch.setenv("AGENT_GATEWAY_DEV", text)
    settings = cli.settings_from(cli.build_parser().parse_args(["serve"]))
    assert settings.mask_secrets is on and settings.dev is on


@pytest.mark.parametrize(("variable", "text"), [("MASK_SECRETS", "enabled"), ("DEV", "")])
def test_a_switch_variable_with_another_word_is_refused_not_read_as_off(
    variable: str, text: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    # "enabled" used to turn masking off: secrets then reached the outputs unmasked.
    monkeypatch.setenv("AGENT_GATEWAY_" + variable, text)
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err == (
        f"agent-gateway: AGENT_GATEWAY_{variable} must be one of 1/true/yes/on"
        f" or 0/false/no/off, not {text!r}\n"
    )


def test_help_still_works_with_a_bad_switch_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AGENT_GATEWAY_MASK_SECRETS", "enabled")
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--help"])
    assert exited.value.code == 0
    assert "--mask-secrets" in capsys.readouterr().out
