"""The pure core of agent-gateway: sessions as explicit state machines, with no I/O.

Feed `Hub.handle` decoded commands and facts (time and fresh ids come in as inputs); carry out
the effects it returns. See table.py for the lifecycle and hub.py for the rules across sessions.
"""

from statemachine.hub import Hub
from statemachine.policy import Policy
from statemachine.records import RunGrant, SessionRecord, SessionState
from statemachine.session import Session
from statemachine.table import TRANSITIONS, Action, Transition, Trigger

__all__ = [
    "TRANSITIONS",
    "Action",
    "Hub",
    "Policy",
    "RunGrant",
    "Session",
    "SessionRecord",
    "SessionState",
    "Transition",
    "Trigger",
]
