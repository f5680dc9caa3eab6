"""What goes into the core: decoded commands and the facts the shell reports.

The current time (`now`, in `Millis`) and fresh ids come in with the inputs: the core reads no
clock and draws no random numbers, so every step is reproducible.
"""

from __future__ import annotations

import enum

from attrs import field, frozen

from statemachine.messages import Command, InputEvent, Millis
from statemachine.records import RunGrant, SessionRecord

ConnId = int
"""The shell's handle for one WebSocket connection; opaque to the core."""

# --- facts about runs and connections -----------------------------------------------------------


@frozen
class RunRegistered:
    """The platform created a run (or the shell loaded it from the store)."""

    grant: RunGrant


@frozen
class RunRevoked:
    """The platform deleted the run: its token is dead and its connection must close."""

    run_id: str
    now: Millis


@frozen
class SessionRestored:
    """A session the store remembered from before a gateway restart."""

    record: SessionRecord
    now: Millis


@frozen
class ConnectionOpened:
    """A runtime completed the handshake with the token of run `principal` (a main run)."""

    conn: ConnId
    principal: str
    now: Millis


@frozen
class CommandReceived:
    """A valid command frame. `fresh_session_id` is an unused session id, in case one is needed."""

    conn: ConnId
    request_id: str
    command: Command
    now: Millis
    fresh_session_id: str = ""


@frozen
class ConnectionLost:
    """The connection is gone (closed by either side, or failed)."""

    conn: ConnId
    now: Millis


@frozen
class TimerFired:
    """A deadline the core asked for (`ArmTimer`) has come for this run's session."""

    run_id: str
    now: Millis


@frozen
class InputsPosted:
    """The platform durably queued input events for the run, up to `last_seq`."""

    run_id: str
    last_seq: int
    now: Millis


@frozen
class DrainStarted:
    """The gateway is shutting down: answer what is in flight, then tell runtimes to reconnect."""

    now: Millis


# --- the store's answers to the core's store effects --------------------------------------------


class AppendOutcome(enum.Enum):
    """How an output batch fared in the store."""

    STORED = "stored"  # durable; events whose seq was already stored were skipped
    FENCED = "fenced"  # the run's epoch moved on: this connection was superseded
    REVOKED = "revoked"  # the run was revoked (the core may not have heard yet); nothing stored
    SEQ_GAP = "seq_gap"  # the batch skips a seq; nothing was stored
    SEQ_CONFLICT = "seq_conflict"  # a stored seq came again with another eventId; nothing stored


@frozen
class EpochClaimed:
    """Answer to `ClaimEpoch`: whether every claim held, and each run's log positions."""

    ok: bool
    input_acked_seq: dict[str, int]
    input_last_seq: dict[str, int]
    output_last_seq: dict[str, int] = field(factory=dict)


@frozen
class OutputsAppended:
    """Answer to `AppendOutputs`; `expected_seq` is the seq the log takes next."""

    outcome: AppendOutcome
    expected_seq: int


@frozen
class KVRead:
    """Answer to `ReadKV`: the keys found."""

    kv: dict[str, str]


@frozen
class Written:
    """Answer to an epoch-fenced write (`WriteKV`, `AckInputs`)."""

    fenced: bool
    # Fenced because the run was revoked: told apart, as the core may hear of the revoke only
    # after this answer (both wake in one turn when a group commit holds the revoke and the write).
    revoked: bool = False


@frozen
class InputsRead:
    """Answer to `ReadInputs`: events after the asked seq, in order."""

    events: tuple[InputEvent, ...]


@frozen
class StoreFailed:
    """The store could not do what was asked (the runtime gets `internal`, retryable)."""

    reason: str


StoreAnswer = EpochClaimed | OutputsAppended | KVRead | Written | InputsRead | StoreFailed


@frozen
class StoreAnswered:
    """The store finished the operation the core issued as `ticket`."""

    ticket: int
    answer: StoreAnswer
    now: Millis


Input = (
    RunRegistered
    | RunRevoked
    | SessionRestored
    | ConnectionOpened
    | CommandReceived
    | ConnectionLost
    | TimerFired
    | InputsPosted
    | DrainStarted
    | StoreAnswered
)
