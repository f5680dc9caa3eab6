"""Every (state, trigger) pair of the transition table, driven through the hub with real inputs.

Each pair builds a session really in that state (`session_in`), fires the input that raises the
trigger, and checks the resulting state is the table's target and the effects are the action's.
Pairs no input can raise are listed in UNREACHABLE with the reason; for them the nearest real
input must change nothing, and the Session itself is driven directly.
"""

from __future__ import annotations

import itertools

import pytest
from core_support import (
    ATTEMPT,
    MAIN,
    Held,
    answers,
    attach_cmd,
    changes,
    closes,
    config_cmd,
    error_of,
    frames_to,
    heartbeat_cmd,
    of_type,
    only,
    reply_of,
    session_in,
)

from statemachine.effects import (
    ArmTimer,
    AttemptLost,
    ClaimEpoch,
    CloseConnection,
    Effect,
    SaveSession,
    SendError,
    SendReply,
    SessionChanged,
)
from statemachine.inputs import EpochClaimed, RunRevoked, StoreAnswered, StoreFailed, TimerFired
from statemachine.messages import (
    CloseCode,
    ErrorCode,
    GetConfigResponse,
    HeartbeatResponse,
    RuntimeAttachResponse,
)
from statemachine.records import SessionState
from statemachine.session import Session
from statemachine.table import TRANSITIONS, Action, Trigger

S, T = SessionState, Trigger
PAIRS = list(itertools.product(SessionState, Trigger))
FIRE = "fire"  # the request id of the command that raises the trigger
CLAIM_ANSWERS = (T.CLAIM_HELD, T.CLAIM_FENCED, T.CLAIM_FAILED)


def claim_answer(trigger: Trigger) -> EpochClaimed | StoreFailed:
    """The store's answer that raises a claim trigger."""
    if trigger is T.CLAIM_FAILED:
        return StoreFailed("the disk is full")
    return EpochClaimed(trigger is T.CLAIM_HELD, {MAIN: -1}, {MAIN: -1})

# Pairs no real input can raise, and why:
# - a claim answer reaches the table only when its ticket is the session's current claim, which
#   only `claim` sets (moving to ATTACHED or RECOVERING) and GRANT/GIVE_UP/RELEASE/END clear; so in
#   DETACHED, LEASED and EXPIRED every claim answer is a stale or duplicate one, dropped before
#   the lookup;
# - `check_deadlines` raises LEASE_DEADLINE only in LEASED and RECOVERY_DEADLINE only in EXPIRED,
#   so a timer in any other state finds nothing due.
UNREACHABLE = frozenset(
    {(state, trigger) for state in (S.DETACHED, S.LEASED, S.EXPIRED)
     for trigger in CLAIM_ANSWERS}
    | {(state, T.LEASE_DEADLINE) for state in SessionState if state is not S.LEASED}
    | {(state, T.RECOVERY_DEADLINE) for state in SessionState if state is not S.EXPIRED}
)


def test_the_table_is_total() -> None:
    """Every state answers every trigger: 5 states x 11 triggers, no gaps, nothing extra."""
    assert len(SessionState) * len(Trigger) == 55
    assert set(TRANSITIONS) == set(PAIRS)
    assert all(isinstance(t.target, SessionState) for t in TRANSITIONS.values())
    assert all(isinstance(t.action, Action) for t in TRANSITIONS.values())


def test_unreachable_pairs_are_exactly_the_ignored_ones() -> None:
    """The session never looks those pairs up, so any action but IGNORE there would be dead code."""
    ignored = {pair for pair, t in TRANSITIONS.items() if t.action is Action.IGNORE}
    assert ignored == UNREACHABLE
    assert all(TRANSITIONS[pair].target is pair[0] for pair in UNREACHABLE)


def fire(held: Held, trigger: Trigger) -> list[Effect]:
    """Feed the real input that raises `trigger` for the held session."""
    d, session = held.driver, held.session
    if trigger in (T.ATTACH, T.REATTACH):
        command = attach_cmd(MAIN, epoch=held.epoch, reconnect=trigger is T.REATTACH)
        return d.send(held.conn, command, request_id=FIRE)
    if trigger in CLAIM_ANSWERS:
        return d.answer(d.ticket_of(ClaimEpoch), claim_answer(trigger))
    if trigger is T.HEARTBEAT:
        return d.send(held.conn, heartbeat_cmd(held.session_id, MAIN), request_id=FIRE)
    if trigger is T.USE:
        return d.send(held.conn, config_cmd(held.session_id, MAIN), request_id=FIRE)
    if trigger is T.LEASE_DEADLINE:
        d.advance_to(session.lease_expires_at)
        return d.fire_timers()
    if trigger is T.RECOVERY_DEADLINE:
        d.advance_to(session.recovery_deadline)
        return d.fire_timers()
    if trigger is T.CONNECTION_LOST:
        return d.lose(held.conn)
    return d.feed(RunRevoked(MAIN, d.now))


def fire_nearest(held: Held, trigger: Trigger) -> list[Effect]:
    """For an unreachable pair, the real input that comes closest to raising its trigger."""
    d = held.driver
    if trigger in CLAIM_ANSWERS:
        # A duplicate answer to the claim that made the session (bypassing the driver's
        # exactly-once bookkeeping on purpose: that is the point of a duplicate).
        last_claim = max(e.ticket for e in of_type(d.log, ClaimEpoch))
        return d.hub.handle(StoreAnswered(last_claim, claim_answer(trigger), d.now))
    # A timer for the run arriving now: late, early or duplicate, it finds nothing of its kind due.
    return d.hub.handle(TimerFired(MAIN, d.now))


def check_action(
    held: Held, session: Session, trigger: Trigger, action: Action, effects: list[Effect]
) -> None:
    """The effects the pair's action stands for, as a runtime or the platform would see them."""
    d = held.driver
    fired = answers(effects, FIRE)
    if action is Action.CLAIM:
        claim = only(of_type(effects, ClaimEpoch))
        assert [c.record.run_id for c in claim.claims] == [MAIN]
        assert claim.claims[0].record.state is session.state
        assert claim.claims[0].record.epoch == held.epoch
        assert fired == []  # answered only once the store has spoken
    elif action is Action.GRANT:
        reply = reply_of(effects, RuntimeAttachResponse)
        assert reply.session_id == held.session_id
        assert reply.lease_expires_at == d.now + d.policy.lease_ttl_ms
        assert only(answers(effects)).conn == held.conn
        assert d.timers[MAIN] <= session.lease_expires_at  # some timer will notice the lease end
    elif action is Action.GIVE_UP:
        failed = ErrorCode.INTERNAL if trigger is T.CLAIM_FAILED else ErrorCode.STALE_EPOCH
        assert error_of(effects).code is failed
        assert only(answers(effects)).conn == held.conn
    elif action is Action.RELEASE:
        assert error_of(effects).code is ErrorCode.INTERNAL  # retryable, and the retry...
        assert session.session_id == held.session_id  # ...finds the session to resume
        assert d.timers[MAIN] <= session.recovery_deadline
    elif action is Action.RENEW:
        heartbeat = reply_of(effects, HeartbeatResponse, FIRE)
        assert heartbeat.accepted
        assert heartbeat.next_heartbeat_due_at == d.now + d.policy.heartbeat_interval_ms
        assert session.lease_expires_at == d.now + d.policy.lease_ttl_ms
    elif action is Action.SERVE:
        assert reply_of(effects, GetConfigResponse, FIRE).config == session.grant.config
    elif action in (Action.NOT_ATTACHED, Action.LEASE_EXPIRED):
        code = ErrorCode.NOT_ATTACHED if action is Action.NOT_ATTACHED else ErrorCode.LEASE_EXPIRED
        assert error_of(effects, FIRE).code is code
        assert of_type(effects, SendReply) == []
    elif action is Action.EXPIRE:
        assert only(of_type(effects, SaveSession)).record.state is S.EXPIRED
        assert of_type(effects, ArmTimer) == [ArmTimer(MAIN, session.recovery_deadline)]
    elif action is Action.LOSE:
        assert of_type(effects, AttemptLost) == [AttemptLost(MAIN, ATTEMPT, d.now)]
    elif action is Action.UNBIND:
        assert session.conn is None
        assert frames_to(effects, held.conn) == []
    elif action is Action.END:
        assert closes(effects) == [(held.conn, CloseCode.REVOKED)]
        assert MAIN not in d.hub.sessions
    else:
        pytest.fail(f"reachable pair with action {action}")
    if action not in (Action.GRANT, Action.GIVE_UP, Action.RELEASE, Action.END):
        assert of_type(effects, CloseConnection) == []
    if action is not Action.LOSE:
        assert of_type(effects, AttemptLost) == []


@pytest.mark.parametrize(("state", "trigger"), PAIRS, ids=[f"{s.name}-{t.name}" for s, t in PAIRS])
def test_pair(state: SessionState, trigger: Trigger) -> None:
    """The pair's real input moves the session to the table's target with the action's effects."""
    held = session_in(state)
    session = held.session  # kept: a revoked session leaves the hub but still says its state
    transition = TRANSITIONS[state, trigger]
    if (state, trigger) in UNREACHABLE:
        check_unreachable(held, state, trigger)
        return
    effects = fire(held, trigger)
    assert session.state is transition.target
    expected = [] if transition.target is state else [(state, transition.target)]
    assert changes(effects, MAIN) == expected
    check_action(held, session, trigger, transition.action, effects)
    for conn in {held.conn, 1, 2}:
        assert len(answers(frames_to(effects, conn), FIRE)) <= 1


def check_unreachable(held: Held, state: SessionState, trigger: Trigger) -> None:
    """No input raises the pair: the nearest one changes nothing; the Session follows the table."""
    session = held.session
    effects = fire_nearest(held, trigger)
    assert session.state is state
    assert of_type(effects, SessionChanged) == []
    loud = (SendReply, SendError, CloseConnection, AttemptLost)
    assert [effect for effect in effects if isinstance(effect, loud)] == []
    # Directly on the Session: a claim answer it would accept (its ticket made current by hand)...
    out: list[Effect] = []
    if trigger in CLAIM_ANSWERS:
        session.claim_ticket = 999
        answer = claim_answer(trigger)
        claim = answer if isinstance(answer, EpochClaimed) else None
        granted = session.claim_answered(999, claim, held.driver.now, out)
        assert granted is False
    else:
        # ... or the deadline trigger itself, which only the table lookup can see.
        action = session._fire(trigger, held.driver.now, out)
        assert action is Action.IGNORE
    assert session.state is state
    assert of_type(out, SessionChanged) == []
