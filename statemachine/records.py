"""Durable facts about runs and sessions, as the store keeps them and the core reads them.

They live in the pure package because the core takes them as inputs (a run's grant, a session
restored after a restart); the store (gateway/store) persists them.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen

from statemachine.messages import Capability, Millis, Name


class SessionState(Name):
    """Where a run's session stands (see statemachine/table.py for how it moves)."""

    DETACHED = "detached"
    ATTACHED = "attached"
    LEASED = "leased"
    EXPIRED = "expired"
    RECOVERING = "recovering"


@frozen
class RunGrant:
    """What the platform allows a run (capabilities, secrets, config); its main run if a sub-run."""

    run_id: str
    capabilities: frozenset[Capability]
    secrets: dict[str, str]
    config: dict[str, Any]
    config_version: str
    main_run_id: str | None = None


@frozen
class SessionRecord:
    """A session's durable state: enough to fence stale runtimes and resume after a restart."""

    run_id: str
    session_id: str
    state: SessionState
    epoch: int
    attempt_id: str | None
    runtime_instance_id: str | None
    capabilities: frozenset[Capability]
    lease_expires_at: Millis
    input_acked_seq: int = -1
