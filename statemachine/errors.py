"""The core's one exception family: a command refused, carrying the error frame to answer with."""

from __future__ import annotations

from statemachine.messages import ErrorCode, ErrorPayload


class ProtocolError(Exception):
    """Base of everything the core refuses; `error` is what the runtime is told."""

    def __init__(self, error: ErrorPayload) -> None:
        super().__init__(error.message)
        self.error = error


class Refused(ProtocolError):
    """A command the session cannot carry out in its current state."""

    @classmethod
    def because(cls, code: ErrorCode, message: str) -> Refused:
        """Refuse with a documented code and its documented retry advice."""
        return cls(ErrorPayload.of(code, message))
