"""The store's contract: the one interface the gateway shell talks to for everything durable.

Every write method returns only after its effect is durable (committed to disk per the store's
sync setting): the gateway sends "accepted" to a runtime or the platform only after the call
returns, so a crash can never lose something a client was told is stored. Epoch-fenced writes
(`append_outputs`, `kv_set`, `ack_inputs`) are refused once the run's stored session epoch differs
from the writer's: that is what keeps a superseded runtime from writing, even across gateways.
They are refused too once the run is revoked, so nothing is stored for it after the revoke, and
the answer says so (`AppendOutcome.REVOKED`, `Written.revoked`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from attrs import frozen

from statemachine.inputs import EpochClaimed, OutputsAppended, Written
from statemachine.messages import InputEvent, Millis, OutputEvent
from statemachine.records import RunGrant, SessionRecord


class StoreError(Exception):
    """The store could not do what was asked; callers turn it into a retryable failure."""


class RunExists(StoreError):
    """`create_run` was given a run id that is already taken (even by a revoked run)."""


class UnknownRun(StoreError):
    """The run (or the main run a sub-run names) does not exist or was revoked."""


class InputConflict(StoreError):
    """A posted input re-uses the event id of a queued one, with another type or data."""

    def __init__(self, index: int) -> None:
        super().__init__(f"input {index} re-uses a queued event id with another type or data")
        self.index = index  # which event of the post


@frozen
class NewInput:
    """An input event the platform posts; the store gives it its seq when it queues it."""

    event_id: str
    type: str
    data: dict[str, Any]
    timestamp: Millis


class Store(Protocol):
    """Durable runs, sessions, KV, output logs and input queues, behind one async interface."""

    async def create_run(self, grant: RunGrant, token_hash: bytes) -> None:
        """Register a run and the sha256 digest of its token.

        Raises `RunExists` if the id is taken; `UnknownRun` if `grant.main_run_id` names a run
        that is unknown, revoked, or itself a sub-run (sub-runs nest one level only).
        """
        ...

    async def get_run(self, run_id: str) -> RunGrant | None:
        """The run's grant, or None if the run is unknown or revoked."""
        ...

    async def run_for_token(self, token_hash: bytes) -> str | None:
        """The live run whose token has this sha256 digest (the caller then compares in full)."""
        ...

    async def revoke_run(self, run_id: str) -> bool:
        """Kill the run's token and its sub-runs'; False if it was unknown or already revoked."""
        ...

    async def replace_token(self, run_id: str, token_hash: bytes) -> bool:
        """Give a live run a new token digest (the old token stops working); False if none."""
        ...

    async def list_runs(self) -> list[RunGrant]:
        """Every live run, main runs before sub-runs, to warm the core after a restart."""
        ...

    async def sub_runs(self, main_run_id: str) -> list[str]:
        """The ids of the main run's live sub-runs, in creation order."""
        ...

    async def list_sessions(self) -> list[SessionRecord]:
        """The stored sessions of live runs (with acked input seqs), to restore after a restart."""
        ...

    async def get_session(self, run_id: str) -> SessionRecord | None:
        """The live run's stored session, or None."""
        ...

    async def claim_epoch(self, records: Sequence[SessionRecord]) -> EpochClaimed:
        """Atomically take these sessions at their epochs, unless any run holds a higher one.

        One transaction: if any run's stored epoch is greater than its record's, nothing is written
        and `ok` is False; otherwise every session row is upserted. Either way the answer carries
        each run's acked and last input seq (-1 when none). Raises `UnknownRun` for an unknown run.
        """
        ...

    async def save_session(self, record: SessionRecord) -> None:
        """Persist a session's state, unless a higher epoch is stored (a late, superseded save).

        `record.input_acked_seq` is not written here: acks are kept by `ack_inputs` alone.
        """
        ...

    async def append_outputs(
        self, run_id: str, epoch: int, events: Sequence[OutputEvent]
    ) -> OutputsAppended:
        """Append a batch to the run's output log in one transaction, fenced by `epoch`.

        FENCED if the stored session epoch is not `epoch`, REVOKED if the run is revoked (refused
        too, and told apart: the core may hear of the revoke after this answer). Events whose seq
        is already stored are skipped (an idempotent re-publish); the rest must continue the log
        contiguously (the first seq is 0) and the batch must be strictly increasing, else SEQ_GAP
        and nothing is stored.
        `expected_seq` is the seq the log takes next, after this call.
        """
        ...

    async def read_outputs(self, run_id: str, after_seq: int, limit: int) -> list[OutputEvent]:
        """Up to `limit` stored output events with seq greater than `after_seq`, ascending."""
        ...

    async def last_output_seq(self, run_id: str) -> int:
        """The run's last stored output seq, or -1 if none."""
        ...

    async def count_outputs(self, run_id: str | None = None) -> int:
        """How many output events are stored, for one run or in all."""
        ...

    async def kv_get(self, run_id: str, keys: Sequence[str]) -> dict[str, str]:
        """The values of those keys the run's KV namespace holds (absent keys are left out)."""
        ...

    async def kv_set(self, run_id: str, epoch: int, kv: Mapping[str, str]) -> Written:
        """Write keys of the run's KV namespace in one transaction, fenced by `epoch`."""
        ...

    async def post_inputs(self, run_id: str, events: Sequence[NewInput]) -> list[int]:
        """Queue input events for a live run in one transaction; their seqs continue from 0.

        Returns the seqs given, in order. An event id the run has queued already keeps its seq
        (a retried post queues nothing twice); with another type or data it is an
        `InputConflict` and nothing is queued. Raises `UnknownRun` for an unknown or revoked run.
        """
        ...

    async def read_inputs(self, run_id: str, after_seq: int, limit: int) -> tuple[InputEvent, ...]:
        """Up to `limit` queued input events with seq greater than `after_seq`, ascending."""
        ...

    async def ack_inputs(self, run_id: str, epoch: int, seq: int) -> Written:
        """Mark the run's inputs up to `seq` acknowledged (never lowered), fenced by `epoch`."""
        ...

    async def input_positions(self, run_id: str) -> tuple[int, int]:
        """The run's acked and last input seq (-1 when none)."""
        ...

    async def aclose(self) -> None:
        """Finish queued writes and release the database; later calls raise `StoreError`."""
        ...
