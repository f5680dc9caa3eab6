"""The session transition table: for each (state, trigger), the next state and the action.

This is the whole lifecycle of a run's session in one screen. `Session` (session.py) looks the pair
up and runs the named action; nothing else moves a session between states. Guards that refuse a
trigger outright (a stale epoch, another session's id, a missing capability) run before the lookup
and leave the state as it is.
"""

from __future__ import annotations

from typing import Final

from attrs import frozen

from statemachine.messages import Name
from statemachine.records import SessionState


class Trigger(Name):
    """What can happen to one run's session."""

    ATTACH = "attach"  # attach, reconnect false: a new session for the run
    REATTACH = "reattach"  # attach with reconnect true, or recover: resume this session
    CLAIM_HELD = "claim held"  # the store recorded our epoch: the session is ours
    CLAIM_FENCED = "claim fenced"  # the store holds a higher epoch: another runtime won
    CLAIM_FAILED = "claim failed"  # the store failed, or a later claim took part of a recover
    HEARTBEAT = "heartbeat"
    USE = "use"  # secrets, config, kv, outputs, input acks
    LEASE_DEADLINE = "lease deadline"
    RECOVERY_DEADLINE = "recovery deadline"
    CONNECTION_LOST = "connection lost"
    REVOKED = "revoked"


class Action(Name):
    """What the session does on a transition (a method of Session of the same name)."""

    CLAIM = "claim"  # take the session at an epoch: supersede the old connection, ask the store
    GRANT = "grant"  # the claim held: grant the lease and answer the claimer
    GIVE_UP = "give_up"  # the claim did not hold: the session is not this runtime's; unbind
    RELEASE = "release"  # a resuming claim failed: keep the session resumable (window open)
    RENEW = "renew"  # extend the lease
    SERVE = "serve"  # do what the command asks
    NOT_ATTACHED = "not_attached"  # refuse: no lease held on this connection yet
    LEASE_EXPIRED = "lease_expired"  # refuse: the lease ran out; recover first
    EXPIRE = "expire"  # the lease ran out: start the recovery window
    LOSE = "lose"  # the recovery window closed: report the attempt lost; unbind
    UNBIND = "unbind"  # forget the connection; the lease runs on
    END = "end"  # the run was revoked
    IGNORE = "ignore"  # nothing to do (a late timer, a duplicate fact)


@frozen
class Transition:
    """The outcome of one (state, trigger) pair."""

    target: SessionState
    action: Action


D, A, L, E, R = (
    SessionState.DETACHED,
    SessionState.ATTACHED,
    SessionState.LEASED,
    SessionState.EXPIRED,
    SessionState.RECOVERING,
)
T, X = Trigger, Action

# fmt: off
TRANSITIONS: Final[dict[tuple[SessionState, Trigger], Transition]] = {
    # DETACHED: no session, or one that was lost or revoked. No connection holds it (GIVE_UP, LOSE
    # and END unbind), so the caller guard refuses commands first; the entries fail closed anyway.
    (D, T.ATTACH): Transition(A, X.CLAIM),            (D, T.REATTACH): Transition(A, X.CLAIM),
    (D, T.CLAIM_HELD): Transition(D, X.IGNORE),       (D, T.CLAIM_FENCED): Transition(D, X.IGNORE),
    (D, T.CLAIM_FAILED): Transition(D, X.IGNORE),
    (D, T.HEARTBEAT): Transition(D, X.NOT_ATTACHED),  (D, T.USE): Transition(D, X.NOT_ATTACHED),
    (D, T.LEASE_DEADLINE): Transition(D, X.IGNORE),   (D, T.RECOVERY_DEADLINE): Transition(D, X.IGNORE),
    (D, T.CONNECTION_LOST): Transition(D, X.UNBIND),  (D, T.REVOKED): Transition(D, X.END),
    # ATTACHED: a new session is claiming its epoch in the store.
    (A, T.ATTACH): Transition(A, X.CLAIM),            (A, T.REATTACH): Transition(A, X.CLAIM),
    (A, T.CLAIM_HELD): Transition(L, X.GRANT),        (A, T.CLAIM_FENCED): Transition(D, X.GIVE_UP),
    (A, T.CLAIM_FAILED): Transition(D, X.GIVE_UP),
    (A, T.HEARTBEAT): Transition(A, X.NOT_ATTACHED),  (A, T.USE): Transition(A, X.NOT_ATTACHED),
    (A, T.LEASE_DEADLINE): Transition(A, X.IGNORE),   (A, T.RECOVERY_DEADLINE): Transition(A, X.IGNORE),
    (A, T.CONNECTION_LOST): Transition(A, X.UNBIND),  (A, T.REVOKED): Transition(D, X.END),
    # LEASED: the runtime holds the lease and may use the session.
    (L, T.ATTACH): Transition(A, X.CLAIM),            (L, T.REATTACH): Transition(R, X.CLAIM),
    (L, T.CLAIM_HELD): Transition(L, X.IGNORE),       (L, T.CLAIM_FENCED): Transition(L, X.IGNORE),
    (L, T.CLAIM_FAILED): Transition(L, X.IGNORE),
    (L, T.HEARTBEAT): Transition(L, X.RENEW),         (L, T.USE): Transition(L, X.SERVE),
    (L, T.LEASE_DEADLINE): Transition(E, X.EXPIRE),   (L, T.RECOVERY_DEADLINE): Transition(L, X.IGNORE),
    (L, T.CONNECTION_LOST): Transition(L, X.UNBIND),  (L, T.REVOKED): Transition(D, X.END),
    # EXPIRED: the lease ran out; the recovery window is open.
    (E, T.ATTACH): Transition(A, X.CLAIM),            (E, T.REATTACH): Transition(R, X.CLAIM),
    (E, T.CLAIM_HELD): Transition(E, X.IGNORE),       (E, T.CLAIM_FENCED): Transition(E, X.IGNORE),
    (E, T.CLAIM_FAILED): Transition(E, X.IGNORE),
    (E, T.HEARTBEAT): Transition(E, X.LEASE_EXPIRED), (E, T.USE): Transition(E, X.LEASE_EXPIRED),
    (E, T.LEASE_DEADLINE): Transition(E, X.IGNORE),   (E, T.RECOVERY_DEADLINE): Transition(D, X.LOSE),
    (E, T.CONNECTION_LOST): Transition(E, X.UNBIND),  (E, T.REVOKED): Transition(D, X.END),
    # RECOVERING: a re-attach or recover is claiming its epoch in the store.
    (R, T.ATTACH): Transition(A, X.CLAIM),            (R, T.REATTACH): Transition(R, X.CLAIM),
    (R, T.CLAIM_HELD): Transition(L, X.GRANT),        (R, T.CLAIM_FENCED): Transition(D, X.GIVE_UP),
    (R, T.CLAIM_FAILED): Transition(E, X.RELEASE),
    (R, T.HEARTBEAT): Transition(R, X.NOT_ATTACHED),  (R, T.USE): Transition(R, X.NOT_ATTACHED),
    (R, T.LEASE_DEADLINE): Transition(R, X.IGNORE),   (R, T.RECOVERY_DEADLINE): Transition(R, X.IGNORE),
    (R, T.CONNECTION_LOST): Transition(R, X.UNBIND),  (R, T.REVOKED): Transition(D, X.END),
}
# fmt: on

del D, A, L, E, R, T, X
