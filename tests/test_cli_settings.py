"""What the operator types: a bad setting stops the start with one line naming what to change."""

from __future__ import annotations

import pytest

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
        Settings(**{setting: value})
    assert str(refused.value) == says
    assert refused.value.name == setting


@pytest.mark.parametrize("port", [0, 65535])
def test_both_ends_of_the_port_range_are_accepted(port: int) -> None:
    assert Settings(port=port, control_port=port).port == port
