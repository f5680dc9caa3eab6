"""What comes out of the core: things the shell must do, in the order given.

Store effects carry a `ticket`; the shell answers each with exactly one `StoreAnswered` of that
ticket. Fenced writes carry the writer's `epoch`: the store refuses them once the run's epoch has
moved on, which is what keeps a superseded runtime from writing, even across gateways.
"""

from __future__ import annotations

from attrs import frozen

from statemachine.inputs import ConnId
from statemachine.messages import (
    CloseCode,
    ErrorPayload,
    Millis,
    OutputEvent,
    Reply,
    TaskInputDelivery,
)
from statemachine.records import SessionRecord, SessionState

# --- to the runtime -----------------------------------------------------------------------------


@frozen
class SendReply:
    """Send a command's reply on its paired reply channel."""

    conn: ConnId
    request_id: str
    payload: Reply


@frozen
class SendError:
    """Send `runtime.session.error` for a refused command (`request_id` None: unreadable frame)."""

    conn: ConnId
    request_id: str | None
    error: ErrorPayload


@frozen
class DeliverInputs:
    """Send input events on `service.task.input.event`, with a frame id the gateway chose."""

    conn: ConnId
    delivery_id: str
    delivery: TaskInputDelivery


@frozen
class CloseConnection:
    """Close the connection with a documented code; nothing more is sent on it."""

    conn: ConnId
    code: CloseCode
    reason: str


# --- to the clock -------------------------------------------------------------------------------


@frozen
class ArmTimer:
    """Report `TimerFired(run_id)` at `deadline` (replaces the run's earlier deadline)."""

    run_id: str
    deadline: Millis


# --- to the store -------------------------------------------------------------------------------


@frozen
class EpochClaim:
    """One run's part of a `ClaimEpoch`."""

    record: SessionRecord


@frozen
class ClaimEpoch:
    """Atomically record these sessions as held at their epochs, unless a higher epoch is stored."""

    ticket: int
    claims: tuple[EpochClaim, ...]


@frozen
class AppendOutputs:
    """Append an output batch to the run's log, skipping stored seqs, fenced by `epoch`."""

    ticket: int
    run_id: str
    epoch: int
    events: tuple[OutputEvent, ...]


@frozen
class ReadKV:
    """Read keys of the run's KV namespace."""

    ticket: int
    run_id: str
    keys: tuple[str, ...]


@frozen
class WriteKV:
    """Write keys of the run's KV namespace, fenced by `epoch`."""

    ticket: int
    run_id: str
    epoch: int
    kv: dict[str, str]


@frozen
class ReadInputs:
    """Read up to `limit` queued input events of the run with seq greater than `after_seq`."""

    ticket: int
    run_id: str
    after_seq: int
    limit: int


@frozen
class AckInputs:
    """Record every input of the run up to `seq` as acknowledged, fenced by `epoch`."""

    ticket: int
    run_id: str
    epoch: int
    seq: int


@frozen
class SaveSession:
    """Persist a session's new state (fire and forget: claims also record it)."""

    record: SessionRecord


# --- to the platform and the operators ----------------------------------------------------------


@frozen
class SessionChanged:
    """A session moved between states (for metrics, the control API and the demo's narration)."""

    run_id: str
    session_id: str
    old: SessionState
    new: SessionState
    at: Millis


@frozen
class AttemptLost:
    """The recovery window closed with no runtime back: the platform should retry the run."""

    run_id: str
    attempt_id: str | None
    at: Millis


StoreEffect = ClaimEpoch | AppendOutputs | ReadKV | WriteKV | ReadInputs | AckInputs
Effect = (
    SendReply
    | SendError
    | DeliverInputs
    | CloseConnection
    | ArmTimer
    | StoreEffect
    | SaveSession
    | SessionChanged
    | AttemptLost
)
