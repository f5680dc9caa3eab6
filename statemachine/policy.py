"""The operator's knobs that shape sessions: lease timing, recovery window, rate limits."""

from __future__ import annotations

from attrs import field, frozen
from attrs.validators import ge


@frozen
class Policy:
    """Lease length, how long a lost runtime may come back, how fast a connection may talk."""

    heartbeat_interval_ms: int = field(default=10_000, validator=ge(1000))  # the seed's minimum
    lease_misses: int = field(default=3, validator=ge(1))
    recovery_window_ms: int = field(default=60_000, validator=ge(0))
    command_rate: float = field(default=200.0, validator=ge(0.001))  # commands/s per connection
    command_burst: float = field(default=400.0, validator=ge(1.0))
    input_batch: int = field(default=100, validator=ge(1))  # input events per delivery frame
    max_frame_bytes: int = field(default=1_048_576, validator=ge(1024))  # told to runtimes

    @property
    def lease_ttl_ms(self) -> int:
        """A lease survives this many missed heartbeats' worth of time."""
        return self.heartbeat_interval_ms * self.lease_misses
