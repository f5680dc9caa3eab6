"""Gateway settings: one frozen object, filled from flags, environment variables and defaults.

Each setting names its environment variable (`AGENT_GATEWAY_<NAME>`), so `--help`, the README and
containers all speak of the same knobs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import Attribute, field, frozen

from statemachine.policy import Policy

MAX_PORT = 65535


class SettingError(ValueError):
    """A setting breaks its rule; `name` and `rule` let the CLI name the flag the user typed."""

    def __init__(self, name: str, rule: str, value: object) -> None:
        super().__init__(f"{name} must be {rule}, not {value!r}")
        self.name = name
        self.rule = rule
        self.value = value


Validator = Callable[[Any, "Attribute[Any]", Any], None]


def _bound(number: float) -> str:
    return f"{number:g}" if isinstance(number, float) else str(number)


def _within(rule: str, accepts: Callable[[Any], bool]) -> Validator:
    def check(instance: Any, attribute: Attribute[Any], value: Any) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            # NaN would otherwise be judged by how it compares (always false), and an infinite
            # rate has the token bucket compute with NaN (0 ms elapsed * inf): neither is meant.
            raise SettingError(attribute.name, "a finite number", value)
        if not accepts(value):
            raise SettingError(attribute.name, rule, value)

    return check


def _at_least(low: float) -> Validator:
    return _within(f">= {_bound(low)}", lambda value: value >= low)


def _above(low: float) -> Validator:
    return _within(f"> {_bound(low)}", lambda value: value > low)


def _one_of(*choices: str) -> Validator:
    return _within(f"one of {', '.join(choices)}", lambda value: value in choices)


# The socket layer keeps only a port's low 16 bits (70000 binds 4464) or overflows, so the bound is
# checked here, where the message can still name the setting.
_PORT = _within(f"an integer from 0 to {MAX_PORT}", lambda value: 0 <= value <= MAX_PORT)


def url_host(host: str) -> str:
    """A host as a URL or bind address writes it: a bare IPv6 address would run into the port."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@frozen
class Settings:
    """Everything `agent-gateway serve` can be told."""

    data_dir: Path = field(default=Path(".agent-gateway"), converter=Path)
    host: str = "127.0.0.1"
    port: int = field(default=8443, validator=_PORT)
    control_host: str = "127.0.0.1"
    control_port: int = field(default=8080, validator=_PORT)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    dev: bool = False
    admin_token: str | None = None
    heartbeat_interval_ms: int = field(default=10_000, validator=_at_least(1000))
    lease_misses: int = field(default=3, validator=_at_least(1))
    recovery_window_ms: int = field(default=60_000, validator=_at_least(0))
    command_rate: float = field(default=200.0, validator=_at_least(0.001))
    command_burst: float = field(default=400.0, validator=_at_least(1.0))
    # 4096: a frame carries 1024 bytes of envelope and ids besides its event, config or secrets.
    max_frame_bytes: int = field(default=1_048_576, validator=_at_least(4096))
    outbound_queue: int = field(default=256, validator=_at_least(1))
    send_timeout_s: float = field(default=10.0, validator=_above(0.0))
    max_sessions: int = field(default=50_000, validator=_at_least(1))
    # One run's token (a runtime running code it was handed) must not take every session's slot.
    # A token also acts for its sub-runs, and a recover names up to 256 of them: room for one
    # connection each, twice over while reconnects overlap the connections they replace.
    max_connections_per_run: int = field(default=512, validator=_at_least(1))
    handshake_timeout_s: float = field(default=10.0, validator=_at_least(0.1))
    drain_timeout_s: float = field(default=10.0, validator=_at_least(0.0))
    store_sync: str = field(default="full", validator=_one_of("full", "normal"))
    mask_secrets: bool = True

    def policy(self) -> Policy:
        """The part of the settings the pure core needs."""
        return Policy(
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            lease_misses=self.lease_misses,
            recovery_window_ms=self.recovery_window_ms,
            command_rate=self.command_rate,
            command_burst=self.command_burst,
            max_frame_bytes=self.max_frame_bytes,
        )

    @property
    def database(self) -> Path:
        """Where the embedded store keeps its SQLite file."""
        return self.data_dir / "gateway.sqlite3"

    @property
    def hard_frame_bytes(self) -> int:
        """The transport's own limit: frames above it close the connection (1009).

        Between `max_frame_bytes` and this, a frame is read and refused with `payload_too_large`,
        which tells the runtime what went wrong without tearing down its session.
        """
        return self.max_frame_bytes * 2
