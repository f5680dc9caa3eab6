"""The core's behaviour as runtimes, the platform and the store see it, scenario by scenario.

Each test drives a real Hub through `Driver` (a fake clock and an in-memory store standing in for
the trio shell) and checks the effects: what is sent to whom, what the store is asked, and when.
"""

from __future__ import annotations

from typing import Any

import pytest
from core_support import (
    ATTEMPT,
    CONFIG,
    INSTANCE,
    MAIN,
    OTHER,
    OTHER_SUB,
    SECRETS,
    SUB,
    SUB2,
    Driver,
    ack_cmd,
    answers,
    attach_cmd,
    changes,
    closes,
    config_cmd,
    error_code,
    error_of,
    frames_to,
    grant,
    heartbeat_cmd,
    input_event,
    kv_get_cmd,
    kv_set_cmd,
    of_type,
    of_types,
    only,
    output,
    publish_cmd,
    recover_cmd,
    reply_of,
    secrets_cmd,
)

from statemachine.effects import (
    AckInputs,
    AppendOutputs,
    ArmTimer,
    AttemptLost,
    ClaimEpoch,
    CloseConnection,
    DeliverInputs,
    Effect,
    ReadInputs,
    ReadKV,
    SaveSession,
    SendError,
    SendReply,
    WriteKV,
)
from statemachine.inputs import (
    AppendOutcome,
    DrainStarted,
    EpochClaimed,
    OutputsAppended,
    RunRegistered,
    RunRevoked,
    SessionRestored,
)
from statemachine.messages import (
    AckInputResponse,
    Capability,
    CloseCode,
    ErrorCode,
    GetConfigResponse,
    GetKVResponse,
    GetSecretsResponse,
    HeartbeatResponse,
    Millis,
    PublishOutputEventsRequest,
    PublishOutputEventsResponse,
    RecoverConnectionsResponse,
    RuntimeAttachResponse,
    SetKVResponse,
    TaskInputDelivery,
)
from statemachine.policy import Policy
from statemachine.records import SessionRecord, SessionState

L, E, D, A, R = (
    SessionState.LEASED,
    SessionState.EXPIRED,
    SessionState.DETACHED,
    SessionState.ATTACHED,
    SessionState.RECOVERING,
)


def leased(policy: Policy | None = None, **attach: Any) -> tuple[Driver, str]:
    """A driver whose main run is attached and leased on connection 1; and its session id."""
    d = Driver(policy, runs=[grant(MAIN), grant(SUB, MAIN), grant(SUB2, MAIN), grant(OTHER),
                             grant(OTHER_SUB, OTHER)])
    d.open(1)
    return d, d.attach_leased(1, MAIN, **attach)


def expire(d: Driver, run_id: str = MAIN) -> list[Effect]:
    """Let the run's lease run out and its timer fire."""
    d.advance_to(d.session(run_id).lease_expires_at)
    return d.fire_timers()


def snapshot(d: Driver, *runs: str) -> list[tuple[object, ...]]:
    """What a refused claim must leave untouched, per run."""
    fresh = (D, None, "", -1, None)  # a run never attached may have no Session object yet
    return [
        fresh if s is None else (s.state, s.conn, s.session_id, s.epoch, s.claim_ticket)
        for s in (d.hub.sessions.get(run_id) for run_id in runs)
    ]


# --- the happy path -------------------------------------------------------------------------------


def test_attach_is_answered_only_after_the_store_claimed_the_epoch() -> None:
    d = Driver(runs=[grant(MAIN)])
    d.open(1)
    effects = d.send(1, attach_cmd(MAIN), request_id="a1")
    assert answers(effects) == []
    record = only(only(of_type(effects, ClaimEpoch)).claims).record
    assert (record.run_id, record.state, record.epoch) == (MAIN, A, 0)  # no epoch given: 0
    assert (record.attempt_id, record.runtime_instance_id) == (ATTEMPT, INSTANCE)
    assert changes(effects, MAIN) == [(D, A)]

    effects = d.settle()
    reply = reply_of(effects, RuntimeAttachResponse, "a1")
    assert reply == RuntimeAttachResponse(
        session_id=record.session_id,
        run_id=MAIN,
        heartbeat_interval_ms=d.policy.heartbeat_interval_ms,
        lease_expires_at=Millis(d.now + d.policy.lease_ttl_ms),
        config_version="cfg-1",
        next_output_seq=0,  # a new run's log starts at 0
        max_frame_bytes=d.policy.max_frame_bytes,
    )
    assert changes(effects, MAIN) == [(A, L)]
    assert ArmTimer(MAIN, reply.lease_expires_at) in effects
    assert only(answers(effects)).conn == 1


def test_heartbeats_renew_the_lease() -> None:
    d, sid = leased()
    first_deadline = d.session(MAIN).lease_expires_at
    for _ in range(5):  # well past the first lease, renewed every 20s
        d.advance(20_000)
        effects = d.send(1, heartbeat_cmd(sid, MAIN, INSTANCE))
        beat = reply_of(effects, HeartbeatResponse)
        assert beat == HeartbeatResponse(True, Millis(d.now + d.policy.heartbeat_interval_ms))
        effects += d.fire_timers()
        assert changes(effects, MAIN) == []
    assert d.now > first_deadline
    assert d.session(MAIN).lease_expires_at == d.now + d.policy.lease_ttl_ms


def test_secrets_all_named_and_none() -> None:
    d, sid = leased()
    assert reply_of(d.send(1, secrets_cmd(sid, MAIN)), GetSecretsResponse).secrets == SECRETS
    named = d.send(1, secrets_cmd(sid, MAIN, ["API_KEY", "NOT_GRANTED"]))
    assert reply_of(named, GetSecretsResponse).secrets == {"API_KEY": SECRETS["API_KEY"]}
    assert reply_of(d.send(1, secrets_cmd(sid, MAIN, [])), GetSecretsResponse).secrets == {}


def test_capabilities_are_what_was_asked_and_granted() -> None:
    d = Driver(runs=[grant(MAIN, caps=[Capability.SECRETS_READ, Capability.KV_READ])])
    d.open(1)
    sid = d.attach_leased(1, MAIN, caps=[Capability.SECRETS_READ, Capability.KV_WRITE])
    assert d.session(MAIN).capabilities == {Capability.SECRETS_READ}
    assert reply_of(d.send(1, secrets_cmd(sid, MAIN)), GetSecretsResponse).secrets == SECRETS
    for command in (kv_set_cmd(sid, MAIN, {"k": "v"}), kv_get_cmd(sid, MAIN, ["k"])):
        effects = d.send(1, command)
        denied = error_of(effects)
        assert (denied.code, denied.retryable) == (ErrorCode.CAPABILITY_DENIED, False)
        assert of_types(effects, WriteKV, ReadKV) == []
    assert d.unanswered == {}


def test_secrets_need_their_capability_and_never_leak_in_the_refusal() -> None:
    d, sid = leased(caps=[Capability.KV_READ])
    effects = d.send(1, secrets_cmd(sid, MAIN))
    assert error_code(effects) is ErrorCode.CAPABILITY_DENIED
    assert not any(value in repr(effects) for value in SECRETS.values())


def test_config() -> None:
    d, sid = leased()
    assert reply_of(d.send(1, config_cmd(sid, MAIN)), GetConfigResponse).config == CONFIG


def test_kv_write_is_answered_after_the_store_and_read_back() -> None:
    d, sid = leased()
    epoch = d.session(MAIN).epoch
    effects = d.send(1, kv_set_cmd(sid, MAIN, {"a": "1", "b": "2"}), request_id="w")
    assert answers(effects) == []
    write = only(of_type(effects, WriteKV))
    assert (write.run_id, write.epoch, write.kv) == (MAIN, epoch, {"a": "1", "b": "2"})
    assert reply_of(d.settle(), SetKVResponse, "w") == SetKVResponse(True)

    effects = d.send(1, kv_get_cmd(sid, MAIN, ["a", "missing"]), request_id="r")
    assert answers(effects) == []
    assert only(of_type(effects, ReadKV)).keys == ("a", "missing")
    assert reply_of(d.settle(), GetKVResponse, "r").kv == {"a": "1"}


def test_outputs_are_appended_at_the_session_epoch_and_answered_when_durable() -> None:
    d, sid = leased(epoch=3)
    effects = d.send(1, publish_cmd(sid, MAIN, [0, 1, 2]), request_id="p")
    assert answers(effects) == []
    append = only(of_type(effects, AppendOutputs))
    assert (append.run_id, append.epoch, append.events) == (MAIN, 3, tuple(map(output, [0, 1, 2])))
    assert reply_of(d.settle(), PublishOutputEventsResponse, "p").accepted
    assert d.store.outputs[MAIN] == [output(0), output(1), output(2)]
    # A re-publish of stored seqs is accepted and stored once.
    d.send(1, publish_cmd(sid, MAIN, [1, 2, 3]), request_id="again")
    assert reply_of(d.settle(), PublishOutputEventsResponse, "again").accepted
    assert [event.seq for event in d.store.outputs[MAIN]] == [0, 1, 2, 3]


def test_an_empty_output_batch_is_answered_at_once() -> None:
    d, sid = leased()
    effects = d.send(1, publish_cmd(sid, MAIN, []))
    assert reply_of(effects, PublishOutputEventsResponse).accepted
    assert d.unanswered == {}


def test_inputs_are_delivered_then_acknowledged() -> None:
    d, sid = leased()
    epoch = d.session(MAIN).epoch
    effects = d.post_inputs(MAIN, 3)
    read = only(of_type(effects, ReadInputs))
    assert (read.run_id, read.after_seq, read.limit) == (MAIN, -1, d.policy.input_batch)
    effects = d.settle()
    delivery = only(of_type(effects, DeliverInputs))
    assert delivery.conn == 1
    events = tuple(input_event(MAIN, seq) for seq in range(3))
    assert delivery.delivery == TaskInputDelivery(sid, MAIN, events)

    effects = d.send(1, ack_cmd(sid, MAIN, 1), request_id="ack")
    assert answers(effects) == []
    assert only(of_type(effects, AckInputs)) == AckInputs(read.ticket + 1, MAIN, epoch, 1)
    assert reply_of(d.settle(), AckInputResponse, "ack").accepted
    assert d.store.acked[MAIN] == 1
    # Acking what is already acknowledged needs no store trip.
    again = d.send(1, ack_cmd(sid, MAIN, 0))
    assert reply_of(again, AckInputResponse).accepted
    assert d.unanswered == {}


def test_deliveries_are_batched_by_policy() -> None:
    d, _ = leased(Policy(input_batch=2))
    d.post_inputs(MAIN, 5)
    deliveries = of_type(d.settle(), DeliverInputs)
    assert [[e.seq for e in x.delivery.events] for x in deliveries] == [[0, 1], [2, 3], [4]]


def test_no_redelivery_on_a_live_connection() -> None:
    d, sid = leased()
    d.post_inputs(MAIN, 2)
    d.settle()
    # The same fact again, a heartbeat, time passing: nothing is read or sent again.
    effects = d.feed(d.store.post(MAIN, 0, d.now))
    effects += d.send(1, heartbeat_cmd(sid, MAIN))
    d.advance(5_000)
    effects += d.send(1, heartbeat_cmd(sid, MAIN))
    assert of_type(effects, ReadInputs) == [] and of_type(effects, DeliverInputs) == []
    # A new input: only it goes out.
    d.post_inputs(MAIN, 1)
    delivery = only(of_type(d.settle(), DeliverInputs))
    assert [e.seq for e in delivery.delivery.events] == [2]


def test_unacknowledged_inputs_are_redelivered_after_reconnect() -> None:
    d, sid = leased(epoch=1)
    d.post_inputs(MAIN, 3)
    d.settle()
    d.send(1, ack_cmd(sid, MAIN, 0))
    d.settle()
    d.lose(1)
    d.open(2)
    effects = d.send(2, attach_cmd(MAIN, epoch=2, reconnect=True), request_id="re")
    effects += d.settle()
    reply = reply_of(effects, RuntimeAttachResponse, "re")
    assert reply.session_id == sid
    delivery = only(of_type(effects, DeliverInputs))
    assert delivery.conn == 2
    assert [e.seq for e in delivery.delivery.events] == [1, 2]
    # The reply comes first, so the runtime knows its session before its first delivery.
    assert effects.index(only(of_type(effects, SendReply))) < effects.index(delivery)
    assert frames_to(effects, 1) == []


@pytest.mark.parametrize("read_in_flight", [False, True])
@pytest.mark.parametrize("how", ["recover", "reattach"])
def test_a_resume_on_the_live_connection_sends_nothing_twice(
    how: str, read_in_flight: bool
) -> None:
    """A recover or reconnect attach from the link that holds the session is no reconnect.

    What went out on the link stays sent: nothing is delivered again, and an ack of it is
    accepted. A store read in flight when the resume came still delivers what it read, once.
    """
    d, sid = leased(epoch=1)
    d.post_inputs(MAIN, 3)
    delivered = only(of_type(d.settle(), DeliverInputs))
    assert [e.seq for e in delivered.delivery.events] == [0, 1, 2]
    if read_in_flight:
        d.post_inputs(MAIN, 2)  # its read is left unanswered
    command = (recover_cmd(sid, MAIN) if how == "recover"
               else attach_cmd(MAIN, epoch=1, reconnect=True))
    effects = d.send(1, command, request_id="again")
    effects += d.answer_from_store(d.ticket_of(ClaimEpoch))  # granted
    effects += d.send(1, ack_cmd(sid, MAIN, 2), request_id="ack")
    effects += d.settle()
    if how == "recover":
        assert reply_of(effects, RecoverConnectionsResponse, "again").accepted
    else:
        assert reply_of(effects, RuntimeAttachResponse, "again").session_id == sid
    assert reply_of(effects, AckInputResponse, "ack").accepted
    assert d.store.acked[MAIN] == 2
    sent = [e.seq for x in of_type(effects, DeliverInputs) for e in x.delivery.events]
    assert sent == ([3, 4] if read_in_flight else [])


def test_inputs_posted_before_attach_are_delivered_after_the_attach_reply() -> None:
    d = Driver(runs=[grant(MAIN)])
    d.post_inputs(MAIN, 2)
    d.open(1)
    effects = d.send(1, attach_cmd(MAIN)) + d.settle()
    kinds = [type(e) for e in effects if isinstance(e, (SendReply, DeliverInputs))]
    assert kinds == [SendReply, DeliverInputs]
    assert [e.seq for e in only(of_type(effects, DeliverInputs)).delivery.events] == [0, 1]


def test_an_ack_beyond_what_was_delivered_is_a_seq_gap() -> None:
    d, sid = leased()
    d.post_inputs(MAIN, 2)
    d.settle()
    effects = d.send(1, ack_cmd(sid, MAIN, 2))
    gap = error_of(effects)
    assert (gap.code, gap.retryable) == (ErrorCode.SEQ_GAP, False)
    assert "1" in gap.message  # the last delivered seq
    assert d.unanswered == {}


@pytest.mark.parametrize("how", ["recover", "reattach"])
def test_inputs_processed_before_a_drop_may_be_acked_before_they_are_sent_again(
    how: str,
) -> None:
    """An ack means "processed up to here" (extensions.json), whichever connection got them.

    Right after resuming, the runtime acks what it processed before its link dropped, while
    their redelivery is still being read: that is no gap, and they are not sent again. Inputs
    queued after the resume can only have gone out on the new link.
    """
    d, sid = leased(epoch=1)
    d.post_inputs(MAIN, 3)
    assert [e.seq for e in only(of_type(d.settle(), DeliverInputs)).delivery.events] == [0, 1, 2]
    d.lose(1)
    d.open(2)
    command = (recover_cmd(sid, MAIN, epoch=2) if how == "recover"
               else attach_cmd(MAIN, epoch=2, reconnect=True))
    effects = d.send(2, command, request_id="resume")
    effects += d.answer_from_store(d.ticket_of(ClaimEpoch))  # granted; the redelivery is read
    d.post_inputs(MAIN, 1)  # seq 3, queued after the resume
    effects += d.send(2, ack_cmd(sid, MAIN, 2), request_id="ack")
    effects += d.send(2, ack_cmd(sid, MAIN, 3), request_id="early")
    assert error_of(effects, "early").code is ErrorCode.SEQ_GAP
    # The ack is durable before the redelivery's read returns (had the read come first, 0-2
    # would go out again: at least once, and the runtime skips seqs it has processed).
    effects += d.answer_from_store(d.ticket_of(AckInputs))
    effects += d.settle()
    assert reply_of(effects, AckInputResponse, "ack").accepted
    assert d.store.acked[MAIN] == 2
    sent = [e.seq for x in of_type(effects, DeliverInputs) for e in x.delivery.events]
    assert sent == [3]


def test_inputs_queued_while_no_link_existed_may_not_be_acked_unseen_after_a_resume() -> None:
    """Only what an earlier connection was sent counts as delivered, not all that was queued."""
    d, sid = leased(epoch=1)
    d.post_inputs(MAIN, 3)
    d.settle()  # 0-2 delivered on link 1
    d.lose(1)
    d.post_inputs(MAIN, 3)  # 3-5 queued while no link exists: never sent anywhere
    d.open(2)
    d.send(2, attach_cmd(MAIN, epoch=2, reconnect=True), request_id="re")
    d.answer_from_store(d.ticket_of(ClaimEpoch))  # granted; the redelivery's read in flight
    effects = d.send(2, ack_cmd(sid, MAIN, 5), request_id="ack") + d.settle()
    assert error_of(effects, "ack").code is ErrorCode.SEQ_GAP
    sent = [e.seq for x in of_type(effects, DeliverInputs) for e in x.delivery.events]
    assert sent == [0, 1, 2, 3, 4, 5]


def test_a_session_restored_from_its_claim_record_may_be_recovered() -> None:
    """The store keeps a granted fresh attach as its claim left it (ATTACHED), told or not."""
    d = Driver(runs=[grant(MAIN)])
    d.open(1)
    d.send(1, attach_cmd(MAIN, epoch=1), request_id="a")
    stored = only(of_type(d.log, ClaimEpoch)).claims[0].record  # what the store keeps
    sid = reply_of(d.settle(), RuntimeAttachResponse, "a").session_id
    after = Driver(runs=[grant(MAIN)])  # the gateway restarted
    after.feed(SessionRestored(stored, after.now))
    after.open(2)
    effects = after.send(2, recover_cmd(sid, MAIN, epoch=2), request_id="rec") + after.settle()
    assert reply_of(effects, RecoverConnectionsResponse, "rec") == RecoverConnectionsResponse(True)


def test_a_new_session_may_not_ack_inputs_it_was_never_sent() -> None:
    d = Driver(runs=[grant(MAIN)])
    d.post_inputs(MAIN, 2)
    d.open(1)
    effects = d.send(1, attach_cmd(MAIN), request_id="attach")
    effects += d.answer_from_store(d.ticket_of(ClaimEpoch))
    sid = reply_of(effects, RuntimeAttachResponse, "attach").session_id
    gap = error_of(d.send(1, ack_cmd(sid, MAIN, 0), request_id="ack"), "ack")
    assert gap.code is ErrorCode.SEQ_GAP


def test_an_output_batch_that_skips_a_seq_is_refused_with_the_next_seq() -> None:
    d, sid = leased()
    d.send(1, publish_cmd(sid, MAIN, [0, 1]))
    d.settle()
    d.send(1, publish_cmd(sid, MAIN, [3]), request_id="gap")
    gap = error_of(d.settle(), "gap")
    assert (gap.code, gap.retryable) == (ErrorCode.SEQ_GAP, False)
    assert "2" in gap.message
    # Straight from the store's word, too.
    d.send(1, publish_cmd(sid, MAIN, [7]), request_id="gap2")
    effects = d.answer(d.ticket_of(AppendOutputs), OutputsAppended(AppendOutcome.SEQ_GAP, 5))
    assert error_code(effects, "gap2") is ErrorCode.SEQ_GAP
    assert "5" in error_of(effects, "gap2").message


def test_a_stored_seq_under_another_event_id_is_a_conflict_not_a_republish() -> None:
    d, sid = leased()
    d.send(1, publish_cmd(sid, MAIN, [0, 1]))
    d.settle()
    conflicting = PublishOutputEventsRequest(sid, MAIN, (output(1, "another-event"), output(2)))
    d.send(1, conflicting, request_id="conflict")
    refusal = error_of(d.settle(), "conflict")
    assert (refusal.code, refusal.retryable) == (ErrorCode.SEQ_CONFLICT, False)
    assert "2" in refusal.message  # the log's next seq
    assert [event.event_id for event in d.store.outputs[MAIN]] == ["out-0", "out-1"]


def test_the_attach_reply_says_where_the_output_log_goes_on() -> None:
    d, sid = leased(epoch=1)
    d.send(1, publish_cmd(sid, MAIN, [0, 1, 2]))
    d.settle()
    d.lose(1)
    d.open(2)
    d.send(2, attach_cmd(MAIN, epoch=2), request_id="fresh")  # a runtime process starting over
    assert reply_of(d.settle(), RuntimeAttachResponse, "fresh").next_output_seq == 3


def test_a_fenced_append_is_a_stale_epoch() -> None:
    d, sid = leased()
    d.send(1, publish_cmd(sid, MAIN, [0]), request_id="p")
    effects = d.answer(d.ticket_of(AppendOutputs), OutputsAppended(AppendOutcome.FENCED, 0))
    assert error_code(effects, "p") is ErrorCode.STALE_EPOCH


# --- refusals ---------------------------------------------------------------------------------


def test_commands_before_attach_are_not_attached() -> None:
    d = Driver(runs=[grant(MAIN)])
    d.open(1)
    for command in (heartbeat_cmd("s", MAIN), config_cmd("s", MAIN), ack_cmd("s", MAIN, 0)):
        refusal = error_of(d.send(1, command))
        assert (refusal.code, refusal.retryable) == (ErrorCode.NOT_ATTACHED, True)


def test_another_session_id_or_instance_is_a_mismatch() -> None:
    d, sid = leased()
    assert error_code(d.send(1, heartbeat_cmd("other", MAIN))) is ErrorCode.SESSION_MISMATCH
    assert error_code(d.send(1, config_cmd("other", MAIN))) is ErrorCode.SESSION_MISMATCH
    wrong = heartbeat_cmd(sid, MAIN, "another-instance")
    assert error_code(d.send(1, wrong)) is ErrorCode.SESSION_MISMATCH


@pytest.mark.parametrize("version", ["v2", "2", "", "v1.1"])
def test_unsupported_version(version: str) -> None:
    d = Driver(runs=[grant(MAIN)])
    d.open(1)
    effects = d.send(1, attach_cmd(MAIN, version=version))
    refusal = error_of(effects)
    assert (refusal.code, refusal.retryable) == (ErrorCode.UNSUPPORTED_VERSION, False)
    assert of_type(effects, ClaimEpoch) == []
    assert MAIN not in d.hub.sessions or d.session(MAIN).state is D


@pytest.mark.parametrize("version", ["v1", "1", "1.0"])
def test_supported_versions(version: str) -> None:
    d = Driver(runs=[grant(MAIN)])
    d.open(1)
    d.attach_leased(1, MAIN, version=version)


def test_forbidden_runs() -> None:
    d, sid = leased()
    for run_id in (OTHER, OTHER_SUB, "never-registered"):
        refusal = error_of(d.send(1, attach_cmd(run_id)))
        assert (refusal.code, refusal.retryable) == (ErrorCode.FORBIDDEN_RUN, False)
    assert error_code(d.send(1, recover_cmd(sid, OTHER))) is ErrorCode.FORBIDDEN_RUN
    # Its own sub-runs are fine.
    d.attach_leased(1, SUB)


def test_rate_limiting_bursts_then_refills() -> None:
    policy = Policy(command_rate=2.0, command_burst=5.0)
    d, sid = leased(policy)  # the attach took one token

    def burst() -> int:
        """How many commands get in before one is rate limited (any other answer got in)."""
        for sent in range(100):
            answer = only(answers(d.send(1, config_cmd(sid, MAIN))))
            if isinstance(answer, SendError) and answer.error.code is ErrorCode.RATE_LIMITED:
                assert answer.error.retryable
                return sent
        raise AssertionError("never rate limited")

    assert burst() == 4
    d.advance(1_000)  # two tokens at 2 per second
    assert burst() == 2
    d.advance(3_600_000)  # a long idle refills only up to the burst
    assert burst() == 5
    # Per connection: another connection of the same run is not limited.
    d.open(2)
    assert reply_of(d.send(2, attach_cmd(SUB)) + d.settle(), RuntimeAttachResponse).run_id == SUB


# --- lease expiry -------------------------------------------------------------------------------


def test_the_lease_expires_lazily_on_the_next_command() -> None:
    d, sid = leased()
    d.advance(d.policy.lease_ttl_ms)  # no timer fired: the shell's timer may be late
    effects = d.send(1, heartbeat_cmd(sid, MAIN))
    assert changes(effects, MAIN) == [(L, E)]
    refusal = error_of(effects)
    assert (refusal.code, refusal.retryable) == (ErrorCode.LEASE_EXPIRED, True)
    assert of_type(effects, SendReply) == []


def test_the_lease_expires_on_its_timer() -> None:
    d, _ = leased()
    deadline = d.session(MAIN).lease_expires_at
    assert d.timers[MAIN] == deadline
    d.advance_to(deadline - 1)
    assert d.fire_timers() == []
    d.advance(1)
    effects = d.fire_timers()
    assert changes(effects, MAIN) == [(L, E)]
    assert only(of_type(effects, SaveSession)).record.state is E
    window_end = Millis(deadline + d.policy.recovery_window_ms)
    assert of_type(effects, ArmTimer) == [ArmTimer(MAIN, window_end)]


def test_a_heartbeat_just_before_the_deadline_renews_and_the_old_timer_rearms() -> None:
    d, sid = leased()
    old = d.session(MAIN).lease_expires_at
    d.advance_to(old - 1)
    assert reply_of(d.send(1, heartbeat_cmd(sid, MAIN)), HeartbeatResponse).accepted
    d.advance_to(old)
    effects = d.fire_timers()
    assert changes(effects, MAIN) == []
    assert of_type(effects, ArmTimer) == [ArmTimer(MAIN, Millis(old - 1 + d.policy.lease_ttl_ms))]


def test_every_command_after_expiry_is_lease_expired() -> None:
    d, sid = leased()
    d.post_inputs(MAIN, 1)
    d.settle()
    expire(d)
    for command in (
        heartbeat_cmd(sid, MAIN),
        secrets_cmd(sid, MAIN),
        config_cmd(sid, MAIN),
        kv_get_cmd(sid, MAIN, ["k"]),
        kv_set_cmd(sid, MAIN, {"k": "v"}),
        publish_cmd(sid, MAIN, [0]),
        ack_cmd(sid, MAIN, 0),
    ):
        assert error_code(d.send(1, command)) is ErrorCode.LEASE_EXPIRED
    assert d.unanswered == {}


# --- recovery -----------------------------------------------------------------------------------


def test_reattach_within_the_window_resumes_the_session() -> None:
    d, sid = leased(epoch=1)
    expire(d)
    d.advance(d.policy.recovery_window_ms - 1)
    d.open(2)
    effects = d.send(2, attach_cmd(MAIN, epoch=2, reconnect=True), request_id="re")
    assert changes(effects, MAIN) == [(E, R)]
    assert closes(effects) == [(1, CloseCode.SUPERSEDED)]
    effects = d.settle()
    assert reply_of(effects, RuntimeAttachResponse, "re").session_id == sid
    assert changes(effects, MAIN) == [(R, L)]
    assert d.timers[MAIN] <= d.session(MAIN).lease_expires_at
    assert reply_of(d.send(2, heartbeat_cmd(sid, MAIN)), HeartbeatResponse).accepted


def test_a_lease_granted_in_the_window_replaces_the_later_window_timer() -> None:
    d, _ = leased(epoch=1)
    expire(d)
    window_end = d.session(MAIN).recovery_deadline
    assert d.timers[MAIN] == window_end
    d.open(2)
    d.send(2, attach_cmd(MAIN, epoch=2, reconnect=True))
    effects = d.settle()
    lease_end = d.session(MAIN).lease_expires_at
    assert lease_end < window_end
    assert of_type(effects, ArmTimer) == [ArmTimer(MAIN, lease_end)]
    d.advance_to(lease_end)
    assert changes(d.fire_timers(), MAIN) == [(L, E)]


def test_recover_within_the_window_resumes_the_session() -> None:
    d, sid = leased(epoch=1)
    d.lose(1)
    expire(d)
    d.open(2)
    effects = d.send(2, recover_cmd(sid, MAIN, epoch=2), request_id="rc")
    assert answers(effects) == []
    assert only(only(of_type(effects, ClaimEpoch)).claims).record.epoch == 2
    assert reply_of(d.settle(), RecoverConnectionsResponse, "rc").accepted
    assert reply_of(d.send(2, heartbeat_cmd(sid, MAIN)), HeartbeatResponse).accepted


def test_recover_of_a_live_lease_after_a_drop() -> None:
    d, sid = leased(epoch=1)
    d.lose(1)
    d.open(2)
    effects = d.send(2, recover_cmd(sid, MAIN), request_id="rc")  # epoch defaults to the highest
    assert changes(effects, MAIN) == [(L, R)]
    assert reply_of(d.settle(), RecoverConnectionsResponse, "rc").accepted
    assert d.session(MAIN).conn == 2


def test_after_the_window_the_attempt_is_lost_and_only_a_fresh_attach_helps() -> None:
    d, sid = leased(epoch=1)
    d.lose(1)
    expire(d)
    d.advance_to(d.session(MAIN).recovery_deadline)
    effects = d.fire_timers()
    assert changes(effects, MAIN) == [(E, D)]
    assert of_type(effects, AttemptLost) == [AttemptLost(MAIN, ATTEMPT, d.now)]
    d.open(2)
    effects = d.send(2, recover_cmd(sid, MAIN, epoch=2))
    assert reply_of(effects, RecoverConnectionsResponse) == RecoverConnectionsResponse(False)
    assert of_type(effects, ClaimEpoch) == []
    fresh = d.attach_leased(2, MAIN, epoch=2)
    assert fresh != sid


def test_a_lost_attempt_lets_go_of_its_silent_connection() -> None:
    """Once the window closed, the old link holds nothing: it neither fences the next attempt
    (which need not know the epoch) nor acts on the session."""
    d, sid = leased(epoch=1)
    expire(d)
    d.advance_to(d.session(MAIN).recovery_deadline)
    assert len(of_type(d.fire_timers(), AttemptLost)) == 1
    assert d.hub.connections[1].runs == set()
    d.open(2)  # the platform's next attempt; connection 1 is silent but open
    effects = d.send(2, attach_cmd(MAIN, attempt="attempt-2"), request_id="new")
    effects += d.settle()
    new_sid = reply_of(effects, RuntimeAttachResponse, "new").session_id
    assert of_type(effects, CloseConnection) == []  # nothing superseded: 1 held nothing
    assert (d.session(MAIN).state, d.session(MAIN).conn, d.session(MAIN).epoch) == (L, 2, 1)
    for command in (heartbeat_cmd(sid, MAIN), config_cmd(sid, MAIN), config_cmd(new_sid, MAIN)):
        assert error_code(d.send(1, command)) is ErrorCode.NOT_ATTACHED
    d.lose(1)
    assert reply_of(d.send(2, heartbeat_cmd(new_sid, MAIN)), HeartbeatResponse).accepted


def test_the_window_closes_lazily_too() -> None:
    d, sid = leased()
    d.lose(1)
    d.advance(d.policy.lease_ttl_ms + d.policy.recovery_window_ms)  # no timer fired
    d.open(2)
    effects = d.send(2, recover_cmd(sid, MAIN, epoch=2))
    assert changes(effects, MAIN) == [(L, E), (E, D)]
    assert len(of_type(effects, AttemptLost)) == 1
    assert reply_of(effects, RecoverConnectionsResponse) == RecoverConnectionsResponse(False)


def test_recover_binds_the_main_run_and_its_sub_runs_at_once() -> None:
    d, sid = leased(epoch=1)
    subs = {run_id: d.attach_leased(1, run_id, epoch=1) for run_id in (SUB, SUB2)}
    d.lose(1)
    d.open(2)
    effects = d.send(2, recover_cmd(sid, MAIN, [SUB, SUB2], epoch=2), request_id="rc")
    claim = only(of_type(effects, ClaimEpoch))
    assert sorted(c.record.run_id for c in claim.claims) == sorted([MAIN, SUB, SUB2])
    assert {c.record.epoch for c in claim.claims} == {2}
    assert reply_of(d.settle(), RecoverConnectionsResponse, "rc").accepted
    for run_id, session_id in [(MAIN, sid), *subs.items()]:
        assert (d.session(run_id).state, d.session(run_id).conn) == (L, 2)
        beat = d.send(2, heartbeat_cmd(session_id, run_id))
        assert reply_of(beat, HeartbeatResponse).accepted


@pytest.mark.parametrize("flaw", ["never_attached", "held_higher", "other_principal", "not_a_sub"])
def test_recover_is_all_or_nothing(flaw: str) -> None:
    d, sid = leased(epoch=1)
    d.attach_leased(1, SUB, epoch=1)
    subs = [SUB, SUB2]
    expected: ErrorCode | None = None
    if flaw == "never_attached":
        pass  # SUB2 has no session to resume
    elif flaw == "held_higher":
        d.attach_leased(1, SUB2, epoch=5)
        expected = ErrorCode.STALE_EPOCH
    elif flaw == "other_principal":
        d.attach_leased(1, SUB2, epoch=1)
        subs = [SUB, OTHER_SUB]
        expected = ErrorCode.FORBIDDEN_RUN
    else:
        d.attach_leased(1, SUB2, epoch=1)
        subs = [SUB, MAIN]  # MAIN is no sub-run of MAIN
        expected = ErrorCode.FORBIDDEN_RUN
    d.lose(1)
    d.open(2)
    before = snapshot(d, MAIN, SUB, SUB2)
    effects = d.send(2, recover_cmd(sid, MAIN, subs, epoch=2))
    if expected is None:
        assert reply_of(effects, RecoverConnectionsResponse) == RecoverConnectionsResponse(False)
    else:
        assert error_code(effects) is expected
    assert of_type(effects, ClaimEpoch) == []
    assert changes(effects, MAIN) == changes(effects, SUB) == changes(effects, SUB2) == []
    assert snapshot(d, MAIN, SUB, SUB2) == before


def test_a_refused_recover_leases_nothing() -> None:
    """A recover answered with an error must not leave a run leased to the link it refused.

    Here the runtime pipelines a recover of both runs and a fresh attach of the main run. The
    fresh attach supersedes the recover's claim on the main run, so the recover is refused; its
    claim on the sub-run must not lease the sub-run either (the runtime was told it failed).
    """
    d, sid = leased(epoch=1)
    d.attach_leased(1, SUB, epoch=1)
    d.send(1, recover_cmd(sid, MAIN, [SUB]), request_id="recover")
    d.send(1, attach_cmd(MAIN), request_id="main")
    effects = d.settle()
    assert error_code(effects, "recover") is ErrorCode.STALE_EPOCH
    reply_of(effects, RuntimeAttachResponse, "main")
    assert d.session(SUB).state is not L
    effects = d.post_inputs(SUB, 1) + d.settle()
    assert of_type(effects, DeliverInputs) == []


def test_a_recover_never_resumes_a_sub_run_the_runtime_was_not_granted() -> None:
    """A sub-run whose only session is a fresh attach still in flight is not resumable.

    Its sessionId is told to the runtime only by that attach's reply; a recover that resumed it
    would refuse the attach (its claim superseded) and lease the sub-run under an id the runtime
    never learns. So the recover is refused like one naming a DETACHED sub-run, and the attach
    goes on to be granted.
    """
    d, sid = leased(epoch=1)
    d.send(1, attach_cmd(SUB), request_id="sub")
    before = snapshot(d, MAIN, SUB)
    effects = d.send(1, recover_cmd(sid, MAIN, [SUB]), request_id="recover")
    assert reply_of(effects, RecoverConnectionsResponse, "recover") == RecoverConnectionsResponse(
        False
    )
    assert of_type(effects, ClaimEpoch) == [] and snapshot(d, MAIN, SUB) == before
    effects = d.settle()
    told = reply_of(effects, RuntimeAttachResponse, "sub").session_id
    assert (d.session(SUB).state, d.session(SUB).conn, d.session(SUB).session_id) == (L, 1, told)
    delivery = only(of_type(d.post_inputs(SUB, 1) + d.settle(), DeliverInputs))
    assert delivery.delivery.session_id == told


def test_a_recover_never_resumes_a_sub_run_granted_after_its_attach_lost_its_link() -> None:
    """The claim holds after the link dropped: the sub-run is leased, but no reply told its id.

    Resuming it would lease the run under that id (its deliveries sent under it, the runtime's
    heartbeats with the id it knows refused); so the recover answers "no", and the runtime
    attaches the sub-run afresh, as for a claim still in flight.
    """
    d = Driver(runs=[grant(MAIN), grant(SUB, MAIN)])
    d.open(1)
    sid = d.attach_leased(1, MAIN, epoch=1)
    d.send(1, attach_cmd(SUB, epoch=1), request_id="sub")
    d.lose(1)
    d.settle()
    assert d.session(SUB).state is L  # granted, though its reply had no link to go out on
    d.open(2)
    effects = d.send(2, recover_cmd(sid, MAIN, [SUB], epoch=2), request_id="recover")
    assert reply_of(effects, RecoverConnectionsResponse, "recover") == RecoverConnectionsResponse(
        False
    )
    effects = d.send(2, attach_cmd(SUB, epoch=2), request_id="again") + d.settle()
    told = reply_of(effects, RuntimeAttachResponse, "again").session_id
    delivery = only(of_type(d.post_inputs(SUB, 1) + d.settle(), DeliverInputs))
    assert delivery.delivery.session_id == told


def test_commands_naming_a_revoked_or_foreign_run_are_forbidden_not_not_attached() -> None:
    """Attaching would not help: `forbidden_run` (final), not `not_attached` (attach, retry)."""
    d = Driver(runs=[grant(MAIN), grant(SUB, MAIN), grant(OTHER)])
    d.open(1)
    d.attach_leased(1, MAIN, epoch=1)
    sub_sid = d.attach_leased(1, SUB, epoch=1)
    d.feed(RunRevoked(SUB, d.now))
    assert error_code(d.send(1, heartbeat_cmd(sub_sid, SUB))) is ErrorCode.FORBIDDEN_RUN
    assert error_code(d.send(1, config_cmd(sub_sid, SUB))) is ErrorCode.FORBIDDEN_RUN
    assert error_code(d.send(1, heartbeat_cmd(sub_sid, OTHER))) is ErrorCode.FORBIDDEN_RUN
    # A run this token may act on, but has not attached here, is still "attach first":
    d.feed(RunRegistered(grant(SUB2, MAIN)))
    assert error_code(d.send(1, heartbeat_cmd(sub_sid, SUB2))) is ErrorCode.NOT_ATTACHED


def test_recover_of_a_sub_run_names_only_its_main() -> None:
    d, _ = leased(epoch=1)
    sub_sid = d.attach_leased(1, SUB, epoch=1)
    d.attach_leased(1, SUB2, epoch=1)
    effects = d.send(1, recover_cmd(sub_sid, SUB, [SUB2], epoch=2))
    assert error_code(effects) is ErrorCode.FORBIDDEN_RUN


def test_recover_with_another_session_id_is_a_mismatch() -> None:
    d, _ = leased()
    d.open(2)
    effects = d.send(2, recover_cmd("not-the-session", MAIN, epoch=5))
    assert error_code(effects) is ErrorCode.SESSION_MISMATCH


# --- epochs -------------------------------------------------------------------------------------


def test_a_higher_epoch_supersedes_and_the_old_connection_hears_nothing_more() -> None:
    d, sid = leased(epoch=1)
    d.send(1, publish_cmd(sid, MAIN, [0]), request_id="late-publish")
    d.send(1, kv_set_cmd(sid, MAIN, {"k": "old"}), request_id="late-write")
    d.post_inputs(MAIN, 1)  # a read in flight for connection 1
    d.open(2)
    effects = d.send(2, attach_cmd(MAIN, epoch=2), request_id="new")
    assert closes(effects) == [(1, CloseCode.SUPERSEDED)]
    close = only(of_type(effects, CloseConnection))
    assert effects.index(close) < effects.index(only(of_type(effects, ClaimEpoch)))
    closed_at = len(d.log)
    # The old connection's commands and store answers produce nothing for it.
    assert d.send(1, heartbeat_cmd(sid, MAIN)) == []
    assert d.send(1, attach_cmd(MAIN, epoch=9)) == []
    d.settle()
    assert frames_to(d.log[closed_at:], 1) == []
    assert reply_of(d.log[closed_at:], RuntimeAttachResponse, "new").session_id != sid
    assert d.hub.pending == {}


def test_writes_of_a_superseded_connection_are_fenced_by_the_store() -> None:
    d, sid = leased(epoch=1)
    d.send(1, kv_set_cmd(sid, MAIN, {"k": "old"}))
    write = d.ticket_of(WriteKV)
    d.open(2)
    d.send(2, attach_cmd(MAIN, epoch=2, reconnect=True))
    d.answer_from_store(d.ticket_of(ClaimEpoch))  # the new epoch is stored first
    effects = d.answer_from_store(write)
    assert MAIN not in d.store.kv
    assert frames_to(effects, 1) == []


def test_a_lower_epoch_is_stale() -> None:
    d, _ = leased(epoch=5)
    d.open(2)
    effects = d.send(2, attach_cmd(MAIN, epoch=3, reconnect=True))
    refusal = error_of(effects)
    assert (refusal.code, refusal.retryable) == (ErrorCode.STALE_EPOCH, False)
    assert of_types(effects, ClaimEpoch, CloseConnection) == []
    assert (d.session(MAIN).state, d.session(MAIN).conn) == (L, 1)
    # Also once the holder is gone: lower is lower.
    d.lose(1)
    assert error_code(d.send(2, attach_cmd(MAIN, epoch=4))) is ErrorCode.STALE_EPOCH


@pytest.mark.parametrize("epoch", [5, None])
def test_an_equal_epoch_is_stale_while_its_holder_is_live(epoch: int | None) -> None:
    d, sid = leased(epoch=5)
    d.open(2)
    effects = d.send(2, attach_cmd(MAIN, epoch=epoch, reconnect=True))
    assert error_code(effects) is ErrorCode.STALE_EPOCH
    assert error_code(d.send(2, recover_cmd(sid, MAIN, epoch=epoch))) is ErrorCode.STALE_EPOCH
    assert of_type(d.log, CloseConnection) == []


def test_an_equal_epoch_may_take_over_once_the_holder_disconnected() -> None:
    d, sid = leased(epoch=5)
    d.lose(1)
    d.open(2)
    d.send(2, attach_cmd(MAIN, epoch=5, reconnect=True), request_id="re")
    assert reply_of(d.settle(), RuntimeAttachResponse, "re").session_id == sid


def test_the_same_connection_may_reattach_at_its_epoch() -> None:
    d, sid = leased(epoch=5)
    d.send(1, attach_cmd(MAIN, epoch=5, reconnect=True), request_id="re")
    assert reply_of(d.settle(), RuntimeAttachResponse, "re").session_id == sid


def test_a_claim_fenced_by_the_store_is_stale_and_detaches() -> None:
    d = Driver(runs=[grant(MAIN)])
    d.store.epochs[MAIN] = 7  # another gateway took the run at epoch 7
    d.open(1)
    d.send(1, attach_cmd(MAIN, epoch=3), request_id="a")
    effects = d.settle()
    refusal = error_of(effects, "a")
    assert (refusal.code, refusal.retryable) == (ErrorCode.STALE_EPOCH, False)
    assert changes(effects, MAIN) == [(A, D)]
    assert only(of_type(effects, SaveSession)).record.state is D
    sid = d.session(MAIN).session_id
    assert error_code(d.send(1, heartbeat_cmd(sid, MAIN))) is ErrorCode.NOT_ATTACHED


def test_a_claim_given_up_lets_go_of_its_connection() -> None:
    """A fresh attach the store failed leaves the run DETACHED and held by no connection, so
    another link may attach it without knowing the epoch; the first link holds nothing."""
    d = Driver(runs=[grant(MAIN)])
    d.open(1)
    d.send(1, attach_cmd(MAIN), request_id="first")
    effects = d.fail(d.ticket_of(ClaimEpoch))
    assert error_code(effects, "first") is ErrorCode.INTERNAL
    assert (d.session(MAIN).state, d.session(MAIN).conn) == (D, None)
    assert d.hub.connections[1].runs == set()
    d.open(2)
    d.send(2, attach_cmd(MAIN), request_id="second")
    sid = reply_of(d.settle(), RuntimeAttachResponse, "second").session_id
    assert error_code(d.send(1, heartbeat_cmd(sid, MAIN))) is ErrorCode.NOT_ATTACHED


def test_the_epoch_never_goes_down() -> None:
    d, sid = leased(epoch=4)
    d.lose(1)
    d.open(2)
    d.attach_leased(2, MAIN, epoch=6, reconnect=True)
    d.open(3)
    assert error_code(d.send(3, recover_cmd(sid, MAIN, epoch=5))) is ErrorCode.STALE_EPOCH
    assert d.session(MAIN).epoch == 6


# --- revocation ---------------------------------------------------------------------------------


def test_revoke_closes_the_run_connections_and_kills_its_sub_runs() -> None:
    d, sid = leased()
    d.attach_leased(1, SUB)
    d.open(3)  # another connection of the run, holding nothing
    d.open(4, OTHER)
    other = d.attach_leased(4, OTHER)
    d.send(1, kv_set_cmd(sid, MAIN, {"k": "v"}), request_id="in-flight")
    effects = d.feed(RunRevoked(MAIN, d.now))
    assert sorted(closes(effects)) == [(1, CloseCode.REVOKED), (3, CloseCode.REVOKED)]
    assert changes(effects, MAIN) == [(L, D)] and changes(effects, SUB) == [(L, D)]
    assert MAIN not in d.hub.sessions and SUB not in d.hub.sessions
    assert not d.hub.knows_run(MAIN) and not d.hub.knows_run(SUB)
    # The in-flight write's answer goes nowhere; the other run is untouched.
    assert frames_to(d.settle(), 1) == []
    assert reply_of(d.send(4, heartbeat_cmd(other, OTHER)), HeartbeatResponse).accepted
    # The run is gone for good.
    assert d.send(1, heartbeat_cmd(sid, MAIN)) == []
    d.open(5)
    assert error_code(d.send(5, attach_cmd(MAIN))) is ErrorCode.FORBIDDEN_RUN
    assert d.hub.pending == {}


def test_revoking_a_sub_run_leaves_the_main_run_connected() -> None:
    """Close code 4002 tells a runtime "do not reconnect": it must not hit the main run's link."""
    d, sid = leased()
    sub_sid = d.attach_leased(1, SUB)
    effects = d.feed(RunRevoked(SUB, d.now))
    assert changes(effects, SUB) == [(L, D)]
    assert of_type(effects, CloseConnection) == []
    assert (d.session(MAIN).state, d.session(MAIN).conn) == (L, 1)
    assert reply_of(d.send(1, heartbeat_cmd(sid, MAIN)), HeartbeatResponse).accepted
    assert isinstance(only(answers(d.send(1, heartbeat_cmd(sub_sid, SUB)))), SendError)


def test_revoking_a_sub_run_while_a_recover_claims_it_is_forbidden_run() -> None:
    """The recover is answered as if the revocation came first (no higher epoch holds anything,
    so not stale_epoch, which would tell the runtime to drop the link), and the main run stays
    resumable: a recover without the sub-run resumes it."""
    d, sid = leased(epoch=1)
    d.attach_leased(1, SUB, epoch=1)
    d.lose(1)
    d.open(2)
    d.send(2, recover_cmd(sid, MAIN, [SUB], epoch=2), request_id="rc")
    d.feed(RunRevoked(SUB, d.now))
    effects = d.settle()
    refusal = error_of(effects, "rc")
    assert (refusal.code, refusal.retryable) == (ErrorCode.FORBIDDEN_RUN, False)
    assert error_code(d.send(2, recover_cmd(sid, MAIN, [SUB]))) is ErrorCode.FORBIDDEN_RUN
    main = d.session(MAIN)
    assert (main.state, main.session_id, main.conn) == (E, sid, 2)
    d.send(2, recover_cmd(sid, MAIN), request_id="again")
    assert reply_of(d.settle(), RecoverConnectionsResponse, "again").accepted
    assert reply_of(d.send(2, heartbeat_cmd(sid, MAIN)), HeartbeatResponse).accepted


def test_an_attach_of_a_sub_run_revoked_in_flight_is_forbidden_run() -> None:
    """Not stale_epoch: that tells the runtime to stop using a link its main run still holds."""
    d, sid = leased(epoch=1)
    d.send(1, attach_cmd(SUB, epoch=1), request_id="sub")
    d.feed(RunRevoked(SUB, d.now))
    effects = d.settle()
    assert error_code(effects, "sub") is ErrorCode.FORBIDDEN_RUN
    assert error_code(d.send(1, attach_cmd(SUB, epoch=1))) is ErrorCode.FORBIDDEN_RUN
    assert reply_of(d.send(1, heartbeat_cmd(sid, MAIN)), HeartbeatResponse).accepted


# --- draining -----------------------------------------------------------------------------------


def test_drain_closes_idle_connections_at_once_and_busy_ones_after_their_answers() -> None:
    d, sid = leased()
    d.open(2, OTHER)
    other = d.attach_leased(2, OTHER)
    d.send(2, kv_set_cmd(other, OTHER, {"a": "1"}), request_id="w1")
    d.send(2, publish_cmd(other, OTHER, [0]), request_id="w2")
    effects = d.feed(DrainStarted(d.now))
    assert closes(effects) == [(1, CloseCode.SERVICE_RESTART)]
    assert d.send(1, heartbeat_cmd(sid, MAIN)) == []
    # A command answered at once does not close the busy connection.
    assert reply_of(d.send(2, heartbeat_cmd(other, OTHER)), HeartbeatResponse).accepted
    first = d.answer_from_store(d.ticket_of(WriteKV))
    assert reply_of(first, SetKVResponse, "w1").accepted
    assert of_type(first, CloseConnection) == []
    last = d.answer_from_store(d.ticket_of(AppendOutputs))
    assert [type(e) for e in last if isinstance(e, (SendReply, CloseConnection))] == [
        SendReply, CloseConnection
    ]
    assert closes(last) == [(2, CloseCode.SERVICE_RESTART)]
    # Sessions survive the drain: their leases run on for the runtimes to come back.
    assert (d.session(MAIN).state, d.session(MAIN).conn) == (L, None)
    assert (d.session(OTHER).state, d.session(OTHER).conn) == (L, None)


# --- restart ------------------------------------------------------------------------------------


def record(state: SessionState, epoch: int = 3, acked: int = -1) -> SessionRecord:
    """A session as the store remembered it before a restart, its lease long gone."""
    return SessionRecord(MAIN, "restored", state, epoch, ATTEMPT, INSTANCE,
                         frozenset(Capability), Millis(1_000), acked)


@pytest.mark.parametrize("state", [L, A, R])
def test_a_restored_live_session_gets_a_grace_lease(state: SessionState) -> None:
    d = Driver(runs=[grant(MAIN)])
    d.advance(10_000)
    effects = d.feed(SessionRestored(record(state), d.now))
    session = d.session(MAIN)
    assert (session.state, session.session_id, session.epoch) == (L, "restored", 3)
    assert session.lease_expires_at == d.now + d.policy.lease_ttl_ms
    assert of_type(effects, ArmTimer) == [ArmTimer(MAIN, session.lease_expires_at)]
    d.open(1)
    assert error_code(d.send(1, attach_cmd(MAIN, epoch=2, reconnect=True))) is ErrorCode.STALE_EPOCH
    d.send(1, attach_cmd(MAIN, epoch=4, reconnect=True), request_id="re")
    assert reply_of(d.settle(), RuntimeAttachResponse, "re").session_id == "restored"


def test_a_restored_expired_session_gets_a_fresh_window() -> None:
    d = Driver(runs=[grant(MAIN)])
    effects = d.feed(SessionRestored(record(E), d.now))
    deadline = d.now + d.policy.recovery_window_ms
    assert d.session(MAIN).state is E
    assert of_type(effects, ArmTimer) == [ArmTimer(MAIN, Millis(deadline))]
    d.advance_to(deadline)
    assert of_type(d.fire_timers(), AttemptLost) == [AttemptLost(MAIN, ATTEMPT, d.now)]


def test_a_restored_detached_session_cannot_be_recovered() -> None:
    d = Driver(runs=[grant(MAIN)])
    d.feed(SessionRestored(record(D), d.now))
    d.open(1)
    effects = d.send(1, recover_cmd("restored", MAIN, epoch=4))
    assert reply_of(effects, RecoverConnectionsResponse) == RecoverConnectionsResponse(False)


def test_a_restored_session_of_an_unknown_run_is_dropped() -> None:
    d = Driver(runs=[grant(OTHER)])
    assert d.feed(SessionRestored(record(L), d.now)) == []
    assert MAIN not in d.hub.sessions


# --- store failures -------------------------------------------------------------------------------


def issue(d: Driver, sid: str, op: str) -> None:
    """Send the command whose store operation is `op`, as request "op"."""
    if op == "attach":
        d.open(2)
        d.send(2, attach_cmd(MAIN, epoch=2, reconnect=True), request_id="op")
    elif op == "recover":
        d.lose(1)
        d.open(2)
        d.send(2, recover_cmd(sid, MAIN, epoch=2), request_id="op")
    elif op == "kv_get":
        d.send(1, kv_get_cmd(sid, MAIN, ["k"]), request_id="op")
    elif op == "kv_set":
        d.send(1, kv_set_cmd(sid, MAIN, {"k": "v"}), request_id="op")
    elif op == "publish":
        d.send(1, publish_cmd(sid, MAIN, [0]), request_id="op")
    else:
        d.post_inputs(MAIN, 1)
        d.settle()
        d.send(1, ack_cmd(sid, MAIN, 0), request_id="op")


STORE_OPS = ["attach", "recover", "kv_get", "kv_set", "publish", "ack"]


@pytest.mark.parametrize("op", STORE_OPS)
def test_a_store_failure_is_a_retryable_internal_error(op: str) -> None:
    d, sid = leased(epoch=1)
    issue(d, sid, op)
    ticket = only(sorted(d.unanswered))
    effects = d.fail(ticket, "disk unavailable at /var/lib/secret-path")
    failure = error_of(effects, "op")
    assert (failure.code, failure.retryable) == (ErrorCode.INTERNAL, True)
    assert "secret-path" not in failure.message
    assert d.hub.pending == {}


@pytest.mark.parametrize("op", ["attach", "recover"])
def test_a_resuming_claim_that_failed_in_the_store_can_be_retried(op: str) -> None:
    """`internal` is retryable: sending the same command again must be able to succeed.

    A re-attach or recover whose claim the store failed must leave the session resumable, so the
    same command, retried, resumes the same session.
    """
    d, sid = leased(epoch=1)
    issue(d, sid, op)
    d.fail(only(sorted(d.unanswered)))
    command = (attach_cmd(MAIN, epoch=2, reconnect=True) if op == "attach"
               else recover_cmd(sid, MAIN, epoch=2))
    effects = d.send(2, command, request_id="retry")
    effects += d.settle()
    if op == "attach":
        assert reply_of(effects, RuntimeAttachResponse, "retry").session_id == sid
    else:
        assert reply_of(effects, RecoverConnectionsResponse, "retry").accepted
    assert d.session(MAIN).state is L


def test_a_failed_input_read_is_retried_on_the_next_heartbeat() -> None:
    d, sid = leased()
    d.post_inputs(MAIN, 2)
    d.fail(d.ticket_of(ReadInputs))
    effects = d.send(1, heartbeat_cmd(sid, MAIN))
    assert only(of_type(effects, ReadInputs)).after_seq == -1
    delivery = only(of_type(d.settle(), DeliverInputs))
    assert [e.seq for e in delivery.delivery.events] == [0, 1]


def test_a_failed_input_read_is_retried_on_the_next_post() -> None:
    d, _ = leased()
    d.post_inputs(MAIN, 2)
    effects = d.fail(d.ticket_of(ReadInputs))
    assert [e for e in effects if isinstance(e, (SendError, SendReply, DeliverInputs))] == []
    effects = d.post_inputs(MAIN, 1)
    assert only(of_type(effects, ReadInputs)).after_seq == -1
    delivery = only(of_type(d.settle(), DeliverInputs))
    assert [e.seq for e in delivery.delivery.events] == [0, 1, 2]


def test_a_claim_answer_for_a_lost_connection_still_grants_the_lease() -> None:
    d = Driver(runs=[grant(MAIN)])
    d.open(1)
    d.send(1, attach_cmd(MAIN, epoch=1))
    d.lose(1)
    effects = d.settle()
    assert answers(effects) == []
    assert (d.session(MAIN).state, d.session(MAIN).conn) == (L, None)
    sid = d.session(MAIN).session_id
    d.open(2)
    d.send(2, attach_cmd(MAIN, epoch=2, reconnect=True), request_id="re")
    assert reply_of(d.settle(), RuntimeAttachResponse, "re").session_id == sid


@pytest.mark.parametrize("stale_first", [True, False])
def test_a_superseded_claim_answer_decides_nothing(stale_first: bool) -> None:
    d = Driver(runs=[grant(MAIN)])
    d.open(1)
    d.open(2)
    d.send(1, attach_cmd(MAIN, epoch=1), request_id="first")
    first = d.ticket_of(ClaimEpoch)
    d.send(2, attach_cmd(MAIN, epoch=2), request_id="second")
    second = max(d.unanswered)
    if stale_first:
        effects = d.answer(first, EpochClaimed(True, {}, {}))
        assert changes(effects, MAIN) == [] and answers(effects) == []
        assert d.session(MAIN).state is A
        effects += d.answer_from_store(second)
    else:
        effects = d.answer_from_store(second) + d.answer(first, EpochClaimed(True, {}, {}))
    assert reply_of(effects, RuntimeAttachResponse, "second").run_id == MAIN
    assert frames_to(effects, 1) == []
    assert (d.session(MAIN).state, d.session(MAIN).conn, d.session(MAIN).epoch) == (L, 2, 2)


def test_a_runs_lineage_and_family_and_revokes_follow_sub_runs() -> None:
    """The shell masks a run's outputs with its family's secrets, and eventIds with its lineage's
    (fixed while the run lives); revoking a main run takes its live sub-runs along."""
    d = Driver(runs=[grant(MAIN), grant(SUB, main=MAIN), grant(SUB2, main=MAIN), grant(OTHER)])
    assert [g.run_id for g in d.hub.lineage(SUB2)] == [MAIN, SUB2]
    assert [g.run_id for g in d.hub.lineage(MAIN)] == [MAIN]
    assert [g.run_id for g in d.hub.family(SUB2)] == [MAIN, SUB, SUB2]
    assert d.hub.lineage("run-unknown") == [] and d.hub.family("run-unknown") == []
    d.feed(RunRevoked(SUB, d.now))
    assert d.hub.sub_runs[MAIN] == {SUB2}
    assert [g.run_id for g in d.hub.family(MAIN)] == [MAIN, SUB2]
    d.feed(RunRevoked(MAIN, d.now))  # takes its sub-runs along
    assert not d.hub.knows_run(SUB2) and MAIN not in d.hub.sub_runs
    assert [g.run_id for g in d.hub.lineage(OTHER)] == [OTHER]
