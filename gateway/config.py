"""Gateway settings: one frozen object, filled from flags, environment variables and defaults.

Each setting names its environment variable (`AGENT_GATEWAY_<NAME>`), so `--help`, the README and
containers all speak of the same knobs.
"""

from __future__ import annotations

from pathlib import Path

from attrs import field, frozen
from attrs.validators import ge, gt, in_

from statemachine.policy import Policy


@frozen
class Settings:
    """Everything `agent-gateway serve` can be told."""

    data_dir: Path = field(default=Path(".agent-gateway"), converter=Path)
    host: str = "127.0.0.1"
    port: int = field(default=8443, validator=ge(0))
    control_host: str = "127.0.0.1"
    control_port: int = field(default=8080, validator=ge(0))
    tls_cert: Path | None = None
    tls_key: Path | None = None
    dev: bool = False
    admin_token: str | None = None
    heartbeat_interval_ms: int = field(default=10_000, validator=ge(1000))
    lease_misses: int = field(default=3, validator=ge(1))
    recovery_window_ms: int = field(default=60_000, validator=ge(0))
    command_rate: float = field(default=200.0, validator=ge(0.001))
    command_burst: float = field(default=400.0, validator=ge(1.0))
    # 4096: a frame carries 1024 bytes of envelope and ids besides its event, config or secrets.
    max_frame_bytes: int = field(default=1_048_576, validator=ge(4096))
    outbound_queue: int = field(default=256, validator=ge(1))
    send_timeout_s: float = field(default=10.0, validator=gt(0.0))
    max_sessions: int = field(default=50_000, validator=ge(1))
    handshake_timeout_s: float = field(default=10.0, validator=ge(0.1))
    drain_timeout_s: float = field(default=10.0, validator=ge(0.0))
    store_sync: str = field(default="full", validator=in_(("full", "normal")))
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
