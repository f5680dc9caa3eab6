"""The SQLite store keeps the `Store` contract: durable, fenced, exactly-once, and concurrent."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from gateway.store.base import InputConflict, NewInput, RunExists, StoreError, UnknownRun
from gateway.store.sqlite import (
    READ_GROUP,
    SCHEMA_VERSION,
    SQL_INPUT_BY_EVENT,
    SQLiteStore,
    _Request,
    _run_group,
    _run_reads,
    open_sqlite_store,
)
from statemachine.inputs import AppendOutcome, Written
from statemachine.messages import Capability, Millis, OutputEvent
from statemachine.records import RunGrant, SessionRecord, SessionState

pytestmark = pytest.mark.trio

ROOT = Path(__file__).resolve().parent.parent


def grant(run_id: str, main: str | None = None) -> RunGrant:
    """A grant with a bit of everything, so round trips are checked field by field."""
    return RunGrant(
        run_id=run_id,
        capabilities=frozenset({Capability.KV_READ, Capability.KV_WRITE}),
        secrets={"api": "s3cr3t"},
        config={"model": "m", "limits": {"n": 3}, "tags": ["a", "é"]},
        config_version="v1",
        main_run_id=main,
    )


def token(run_id: str) -> bytes:
    """A distinct 32-byte digest per run."""
    return run_id.encode().ljust(32, b"\0")


def record(run_id: str, epoch: int, session_id: str = "s1", lease: int = 1000) -> SessionRecord:
    """An attached session record at `epoch`."""
    return SessionRecord(
        run_id=run_id,
        session_id=session_id,
        state=SessionState.ATTACHED,
        epoch=epoch,
        attempt_id="a1",
        runtime_instance_id="rt-1",
        capabilities=frozenset({Capability.KV_READ}),
        lease_expires_at=Millis(lease),
    )


def events(first: int, count: int, tag: str = "e") -> list[OutputEvent]:
    """Output events with seqs first..first+count-1 and recognisable ids."""
    return [
        OutputEvent(f"{tag}{seq}", seq, "progress", {"seq": seq, "text": "x" * 20}, Millis(seq))
        for seq in range(first, first + count)
    ]


def inputs(count: int, tag: str = "in") -> list[NewInput]:
    """New input events with recognisable ids."""
    return [NewInput(f"{tag}{i}", "message", {"i": i}, Millis(100 + i)) for i in range(count)]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """A fresh store on a temporary file."""
    async with open_sqlite_store(tmp_path / "gw.sqlite3") as opened:
        yield opened


async def attached(store: SQLiteStore, run_id: str, epoch: int = 1) -> None:
    """Create a run and claim its session at `epoch`, as an attach does."""
    await store.create_run(grant(run_id), token(run_id))
    assert (await store.claim_epoch([record(run_id, epoch)])).ok


# --- runs -----------------------------------------------------------------------------------------


async def test_run_round_trip_and_duplicate(store: SQLiteStore) -> None:
    await store.create_run(grant("r1"), token("r1"))
    assert await store.get_run("r1") == grant("r1")
    assert await store.get_run("nope") is None
    with pytest.raises(RunExists):
        await store.create_run(grant("r1"), token("other"))
    with pytest.raises(StoreError) as reused:
        await store.create_run(grant("r2"), token("r1"))
    assert not isinstance(reused.value, RunExists)
    assert await store.get_run("r2") is None


async def test_sub_runs_nest_one_level_under_live_mains(store: SQLiteStore) -> None:
    with pytest.raises(UnknownRun):
        await store.create_run(grant("sub", main="ghost"), token("sub"))
    await store.create_run(grant("main"), token("main"))
    await store.create_run(grant("sub1", main="main"), token("sub1"))
    await store.create_run(grant("sub2", main="main"), token("sub2"))
    with pytest.raises(UnknownRun):
        await store.create_run(grant("subsub", main="sub1"), token("subsub"))
    assert await store.sub_runs("main") == ["sub1", "sub2"]
    assert (await store.get_run("sub1")) == grant("sub1", main="main")
    await store.create_run(grant("gone"), token("gone"))
    await store.revoke_run("gone")
    with pytest.raises(UnknownRun):
        await store.create_run(grant("late", main="gone"), token("late"))


async def test_tokens_and_revocation(store: SQLiteStore) -> None:
    await store.create_run(grant("main"), token("main"))
    await store.create_run(grant("sub", main="main"), token("sub"))
    await store.create_run(grant("other"), token("other"))
    assert await store.run_for_token(token("main")) == "main"
    assert await store.run_for_token(b"\1" * 32) is None

    assert await store.revoke_run("main") is True
    assert await store.run_for_token(token("main")) is None
    assert await store.run_for_token(token("sub")) is None
    assert await store.get_run("main") is None
    assert await store.get_run("sub") is None
    assert await store.sub_runs("main") == []
    assert await store.run_for_token(token("other")) == "other"
    assert await store.revoke_run("main") is False
    assert await store.revoke_run("ghost") is False
    with pytest.raises(RunExists):  # a revoked id is never reused
        await store.create_run(grant("main"), token("main2"))


async def test_list_runs_lists_live_mains_before_subs(store: SQLiteStore) -> None:
    await store.create_run(grant("m1"), token("m1"))
    await store.create_run(grant("s1", main="m1"), token("s1"))
    await store.create_run(grant("m2"), token("m2"))
    await store.create_run(grant("dead"), token("dead"))
    await store.revoke_run("dead")
    runs = await store.list_runs()
    assert [r.run_id for r in runs] == ["m1", "m2", "s1"]
    assert runs[2] == grant("s1", main="m1")


# --- sessions -------------------------------------------------------------------------------------


async def test_claim_stores_sessions_and_answers_positions(store: SQLiteStore) -> None:
    await store.create_run(grant("a"), token("a"))
    await store.create_run(grant("b"), token("b"))
    await store.post_inputs("a", inputs(3))
    claimed = await store.claim_epoch([record("a", 1), record("b", 1)])
    assert claimed.ok
    assert claimed.input_acked_seq == {"a": -1, "b": -1}
    assert claimed.input_last_seq == {"a": 2, "b": -1}
    assert await store.ack_inputs("a", 1, 1) == Written(fenced=False)
    again = await store.claim_epoch([record("a", 2)])
    assert again.ok and again.input_acked_seq == {"a": 1} and again.input_last_seq == {"a": 2}
    stored = await store.get_session("a")
    assert stored == attrs.evolve(record("a", 2), input_acked_seq=1)
    assert [s.run_id for s in await store.list_sessions()] == ["a", "b"]
    with pytest.raises(UnknownRun):
        await store.claim_epoch([record("ghost", 1)])


async def test_lower_claim_is_refused_atomically_across_runs(store: SQLiteStore) -> None:
    await attached(store, "a", epoch=5)
    await attached(store, "b", epoch=1)
    refused = await store.claim_epoch([record("b", 2, session_id="new"), record("a", 4)])
    assert not refused.ok
    assert refused.input_last_seq == {"a": -1, "b": -1}
    b = await store.get_session("b")
    a = await store.get_session("a")
    assert b is not None and b.epoch == 1 and b.session_id == "s1"
    assert a is not None and a.epoch == 5
    same = await store.claim_epoch([record("a", 5, session_id="again"), record("b", 2)])
    assert same.ok  # an equal epoch is the holder's own claim
    a = await store.get_session("a")
    assert a is not None and a.session_id == "again"


async def test_save_session_ignores_older_epochs(store: SQLiteStore) -> None:
    await attached(store, "r", epoch=3)
    await store.save_session(record("r", 2, session_id="stale"))
    current = await store.get_session("r")
    assert current is not None and current.session_id == "s1" and current.epoch == 3
    later = SessionRecord(
        "r", "s1", SessionState.DETACHED, 3, None, None, frozenset(), Millis(5), input_acked_seq=9
    )
    await store.save_session(later)
    saved = await store.get_session("r")
    # Acks are the store's own fact, never taken from a record.
    assert saved == SessionRecord(
        "r", "s1", SessionState.DETACHED, 3, None, None, frozenset(), Millis(5), -1
    )
    await store.save_session(record("r", 4, session_id="newer"))
    newest = await store.get_session("r")
    assert newest is not None and newest.epoch == 4 and newest.session_id == "newer"


async def test_sessions_of_revoked_runs_are_not_listed(store: SQLiteStore) -> None:
    await attached(store, "keep")
    await attached(store, "drop")
    await store.revoke_run("drop")
    assert [s.run_id for s in await store.list_sessions()] == ["keep"]
    assert await store.get_session("drop") is None
    assert await store.get_session("never") is None


# --- outputs --------------------------------------------------------------------------------------


async def test_append_contiguous_and_read_back(store: SQLiteStore) -> None:
    await attached(store, "r")
    first = await store.append_outputs("r", 1, events(0, 3))
    assert (first.outcome, first.expected_seq) == (AppendOutcome.STORED, 3)
    second = await store.append_outputs("r", 1, events(3, 2))
    assert (second.outcome, second.expected_seq) == (AppendOutcome.STORED, 5)
    assert await store.read_outputs("r", -1, 100) == events(0, 5)
    assert await store.read_outputs("r", 1, 2) == events(2, 2)
    assert await store.read_outputs("r", 4, 10) == []
    assert await store.last_output_seq("r") == 4
    assert await store.last_output_seq("empty") == -1
    assert await store.count_outputs("r") == 5
    empty = await store.append_outputs("r", 1, [])
    assert (empty.outcome, empty.expected_seq) == (AppendOutcome.STORED, 5)


async def test_republished_seqs_are_stored_once(store: SQLiteStore) -> None:
    await attached(store, "r")
    await store.append_outputs("r", 1, events(0, 4))
    again = await store.append_outputs("r", 1, events(0, 4))
    assert (again.outcome, again.expected_seq) == (AppendOutcome.STORED, 4)
    overlap = await store.append_outputs("r", 1, [*events(2, 2), *events(4, 2, tag="new")])
    assert (overlap.outcome, overlap.expected_seq) == (AppendOutcome.STORED, 6)
    stored = await store.read_outputs("r", -1, 100)
    assert [e.event_id for e in stored] == ["e0", "e1", "e2", "e3", "new4", "new5"]
    assert await store.count_outputs("r") == 6


async def test_a_stored_seq_under_another_event_id_conflicts(store: SQLiteStore) -> None:
    # A runtime that starts over at seq 0 must not be told "accepted" for events never stored.
    await attached(store, "r")
    await store.append_outputs("r", 1, events(0, 4))
    restarted = await store.append_outputs("r", 1, events(0, 2, tag="fresh"))
    assert (restarted.outcome, restarted.expected_seq) == (AppendOutcome.SEQ_CONFLICT, 4)
    straddling = await store.append_outputs("r", 1, [*events(3, 1, tag="x"), *events(4, 1)])
    assert straddling.outcome is AppendOutcome.SEQ_CONFLICT
    assert await store.count_outputs("r") == 4, "nothing of a conflicting batch is stored"
    claim = await store.claim_epoch([record("r", 2)])
    assert claim.output_last_seq == {"r": 3}


async def test_gaps_are_refused_with_nothing_stored(store: SQLiteStore) -> None:
    await attached(store, "r")
    late_start = await store.append_outputs("r", 1, events(1, 2))
    assert (late_start.outcome, late_start.expected_seq) == (AppendOutcome.SEQ_GAP, 0)
    await store.append_outputs("r", 1, events(0, 3))
    holes = [*events(3, 1), *events(5, 1)]
    gap = await store.append_outputs("r", 1, holes)
    assert (gap.outcome, gap.expected_seq) == (AppendOutcome.SEQ_GAP, 3)
    backwards = [*events(4, 1), *events(3, 1)]
    assert (await store.append_outputs("r", 1, backwards)).outcome is AppendOutcome.SEQ_GAP
    repeated = [*events(3, 1), *events(3, 1)]
    assert (await store.append_outputs("r", 1, repeated)).outcome is AppendOutcome.SEQ_GAP
    negative = events(-1, 1)
    assert (await store.append_outputs("r", 1, negative)).outcome is AppendOutcome.SEQ_GAP
    assert await store.count_outputs("r") == 3
    assert await store.last_output_seq("r") == 2


async def test_writes_are_fenced_after_a_higher_claim(store: SQLiteStore) -> None:
    await attached(store, "r", epoch=1)
    await store.post_inputs("r", inputs(5))
    await store.append_outputs("r", 1, events(0, 2))
    assert (await store.claim_epoch([record("r", 2)])).ok

    fenced = await store.append_outputs("r", 1, events(2, 2))
    assert (fenced.outcome, fenced.expected_seq) == (AppendOutcome.FENCED, 2)
    assert await store.kv_set("r", 1, {"k": "old"}) == Written(fenced=True)
    assert await store.ack_inputs("r", 1, 3) == Written(fenced=True)
    assert await store.count_outputs("r") == 2
    assert await store.kv_get("r", ["k"]) == {}
    assert await store.input_positions("r") == (-1, 4)

    assert (await store.append_outputs("r", 2, events(2, 2))).outcome is AppendOutcome.STORED
    assert await store.kv_set("r", 2, {"k": "new"}) == Written(fenced=False)
    assert await store.ack_inputs("r", 2, 3) == Written(fenced=False)
    assert await store.kv_get("r", ["k"]) == {"k": "new"}
    assert await store.input_positions("r") == (3, 4)


async def test_writes_without_a_session_are_fenced(store: SQLiteStore) -> None:
    await store.create_run(grant("r"), token("r"))
    assert (await store.append_outputs("r", 0, events(0, 1))).outcome is AppendOutcome.FENCED
    assert await store.kv_set("r", 0, {"k": "v"}) == Written(fenced=True)
    assert await store.ack_inputs("r", 0, 0) == Written(fenced=True)


async def test_writes_of_a_revoked_run_are_refused_as_revoked(store: SQLiteStore) -> None:
    # Told apart from an epoch fence: the core may hear of the revoke only after this answer,
    # and must then answer forbidden_run, not stale_epoch.
    await attached(store, "r", epoch=1)
    await store.post_inputs("r", inputs(2))
    await store.revoke_run("r")
    refused = await store.append_outputs("r", 1, events(0, 1))
    assert (refused.outcome, refused.expected_seq) == (AppendOutcome.REVOKED, 0)
    assert await store.kv_set("r", 1, {"k": "v"}) == Written(fenced=True, revoked=True)
    assert await store.ack_inputs("r", 1, 0) == Written(fenced=True, revoked=True)
    assert await store.count_outputs("r") == 0


async def test_count_outputs_in_all_runs(store: SQLiteStore) -> None:
    await attached(store, "a")
    await attached(store, "b")
    await store.append_outputs("a", 1, events(0, 3))
    await store.append_outputs("b", 1, events(0, 4))
    assert await store.count_outputs() == 7
    assert await store.count_outputs("a") == 3


# --- kv -------------------------------------------------------------------------------------------


async def test_kv_set_get_overwrite_and_namespaces(store: SQLiteStore) -> None:
    await attached(store, "a")
    await attached(store, "b")
    assert await store.kv_set("a", 1, {"x": "1", "y": "2"}) == Written(fenced=False)
    assert await store.kv_set("a", 1, {"x": "3"}) == Written(fenced=False)
    await store.kv_set("b", 1, {"x": "other"})
    assert await store.kv_get("a", ["x", "y", "missing", "x"]) == {"x": "3", "y": "2"}
    assert await store.kv_get("b", ["x", "y"]) == {"x": "other"}
    assert await store.kv_get("a", []) == {}
    many = {f"k{i}": str(i) for i in range(1200)}  # more keys than one IN (...) may bind
    await store.kv_set("a", 1, many)
    assert await store.kv_get("a", list(many)) == many


# --- inputs ---------------------------------------------------------------------------------------


async def test_inputs_are_numbered_contiguously_from_zero(store: SQLiteStore) -> None:
    await store.create_run(grant("r"), token("r"))
    assert await store.input_positions("r") == (-1, -1)
    assert await store.post_inputs("r", inputs(3)) == [0, 1, 2]
    assert await store.post_inputs("r", inputs(2, tag="more")) == [3, 4]
    assert await store.post_inputs("r", []) == []
    read = await store.read_inputs("r", 1, 2)
    assert [(e.seq, e.event_id, e.data) for e in read] == [
        (2, "in2", {"i": 2}),
        (3, "more0", {"i": 0}),
    ]
    assert [e.seq for e in await store.read_inputs("r", -1, 100)] == [0, 1, 2, 3, 4]
    assert await store.read_inputs("r", 4, 10) == ()
    assert await store.input_positions("r") == (-1, 4)
    with pytest.raises(UnknownRun):
        await store.post_inputs("ghost", inputs(1))
    await store.revoke_run("r")
    with pytest.raises(UnknownRun):
        await store.post_inputs("r", inputs(1))


async def test_a_retried_post_queues_nothing_twice(store: SQLiteStore) -> None:
    await store.create_run(grant("r"), token("r"))
    assert await store.post_inputs("r", inputs(3)) == [0, 1, 2]
    # The platform lost the answer and posts again, now with one event more, data keys reordered
    # and a later timestamp: the known ids keep their seqs, only the new event is queued.
    again = [attrs.evolve(e, timestamp=Millis(999)) for e in inputs(3)]
    again[1] = attrs.evolve(again[1], data={"i": 1})
    assert await store.post_inputs("r", [*again, *inputs(1, tag="new")]) == [0, 1, 2, 3]
    read = await store.read_inputs("r", -1, 100)
    assert [(e.seq, e.event_id, e.timestamp) for e in read] == [
        (0, "in0", 100), (1, "in1", 101), (2, "in2", 102), (3, "new0", 100)]


async def test_a_known_event_id_with_other_content_queues_nothing(store: SQLiteStore) -> None:
    await store.create_run(grant("r"), token("r"))
    await store.post_inputs("r", inputs(2))
    # Python's == would take True for 1 and 1.0 for 1: as JSON they are other data.
    for changed in ({"type": "other"}, {"data": {"i": 1, "extra": True}}, {"data": {"i": True}},
                    {"data": {"i": 1.0}}):
        clash = attrs.evolve(inputs(2)[1], **changed)
        with pytest.raises(InputConflict) as refused:
            await store.post_inputs("r", [*inputs(1, tag="fresh"), clash])
        assert refused.value.index == 1
    assert [e.event_id for e in await store.read_inputs("r", -1, 100)] == ["in0", "in1"]


async def test_acked_seq_only_goes_up(store: SQLiteStore) -> None:
    await attached(store, "r")
    await store.post_inputs("r", inputs(10))
    await store.ack_inputs("r", 1, 5)
    await store.ack_inputs("r", 1, 2)
    assert await store.input_positions("r") == (5, 9)
    await store.ack_inputs("r", 1, 7)
    assert await store.input_positions("r") == (7, 9)
    session = await store.get_session("r")
    assert session is not None and session.input_acked_seq == 7


# --- group commit ---------------------------------------------------------------------------------


async def test_a_failing_op_does_not_abort_its_group(store: SQLiteStore) -> None:
    await attached(store, "r")
    results: dict[str, Any] = {}

    async def attempt(name: str, fn: Any) -> None:
        try:
            results[name] = await fn()
        except StoreError as error:
            results[name] = error

    async with trio.open_nursery() as nursery:
        nursery.start_soon(attempt, "dup", lambda: store.create_run(grant("r"), token("x")))
        nursery.start_soon(attempt, "append", lambda: store.append_outputs("r", 1, events(0, 3)))
        nursery.start_soon(attempt, "kv", lambda: store.kv_set("r", 1, {"k": "v"}))
        nursery.start_soon(attempt, "gap", lambda: store.append_outputs("r", 1, events(9, 1)))
        nursery.start_soon(attempt, "new", lambda: store.create_run(grant("n"), token("n")))
    assert isinstance(results["dup"], RunExists)
    assert results["kv"] == Written(fenced=False)
    assert results["new"] is None
    assert await store.get_run("n") == grant("n")
    assert await store.kv_get("r", ["k"]) == {"k": "v"}
    assert [e.seq for e in await store.read_outputs("r", -1, 10)] == [0, 1, 2]


def _scratch() -> sqlite3.Connection:
    """An in-memory database whose COMMIT fails when a child row has no parent."""
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("CREATE TABLE p (id INTEGER PRIMARY KEY)")
    conn.execute("CREATE TABLE c (pid INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED)")
    return conn


def _insert(table: str, value: int, fail: bool = False) -> Any:
    """An op inserting one row, then failing if asked (after it wrote)."""

    def op(conn: sqlite3.Connection) -> int:
        conn.execute(f"INSERT INTO {table} VALUES (?)", (value,))
        if fail:
            raise UnknownRun("after writing")
        return value

    return op


async def test_run_group_undoes_only_the_failing_op() -> None:
    conn = _scratch()
    group = [
        _Request(_insert("p", 1)),
        _Request(_insert("p", 2, fail=True)),
        _Request(_insert("p", 3)),
    ]
    _run_group(conn, group)
    assert [(r.answered, r.result) for r in group] == [(True, 1), (True, None), (True, 3)]
    assert isinstance(group[1].error, UnknownRun)
    assert conn.execute("SELECT id FROM p ORDER BY id").fetchall() == [(1,), (3,)]


async def test_a_failed_commit_fails_every_caller_of_the_group() -> None:
    conn = _scratch()
    group = [_Request(_insert("p", 1)), _Request(_insert("c", 42))]
    _run_group(conn, group)
    for request in group:
        assert request.answered and request.result is None
        assert isinstance(request.error, StoreError)
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM p").fetchone() == (0,)


async def test_a_group_sqlite_rolls_back_whole_fails_every_op_with_the_reason(
    tmp_path: Path,
) -> None:
    # On SQLITE_FULL (a full disk) SQLite undoes the whole transaction itself, not the statement:
    # every op of the group, the ones before the failing op included, must fail, and say why.
    conn = sqlite3.connect(tmp_path / "full.db", isolation_level=None, check_same_thread=False)
    conn.execute("CREATE TABLE p (id INTEGER PRIMARY KEY, pad TEXT)")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")

    def grow(conn: sqlite3.Connection) -> None:
        conn.executemany("INSERT INTO p VALUES (?, ?)", [(n, "x" * 1000) for n in range(2, 50)])

    group = [_Request(_insert_pad(1)), _Request(grow), _Request(_insert_pad(99))]
    _run_group(conn, group)
    for request in group:
        assert request.answered and request.result is None
        assert isinstance(request.error, StoreError)
        assert "transaction rolled back" in str(request.error)
        assert "database or disk is full" in str(request.error)
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM p").fetchone() == (0,)


def _insert_pad(value: int) -> Any:
    def op(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO p VALUES (?, 'x')", (value,))
        return value

    return op


def _select(value: int) -> Any:
    def read(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT ?", (value,)).fetchone()[0])

    return read


def _broken_sql(conn: sqlite3.Connection) -> Any:
    return conn.execute("SELECT * FROM no_such_table").fetchall()


def _bug(conn: sqlite3.Connection) -> Any:
    raise KeyError("a bug in a read")


async def test_reads_run_together_each_answering_its_own_caller() -> None:
    conn = _scratch()
    group = [_Request(_select(1)), _Request(_broken_sql), _Request(_bug), _Request(_select(4))]
    _run_reads(conn, group)
    assert all(request.answered for request in group)
    assert [group[0].result, group[3].result] == [1, 4]
    assert isinstance(group[1].error, StoreError)  # SQLite's errors become the store's
    assert isinstance(group[2].error, KeyError)  # a bug is not disguised


async def test_many_concurrent_reads_each_get_their_own_answer(store: SQLiteStore) -> None:
    # More reads than a group holds, from many tasks at once, failures among them: each caller
    # gets exactly its own answer or its own error.
    answers: dict[int, Any] = {}

    async def one(number: int) -> None:
        fn = _broken_sql if number % 7 == 0 else _select(number)
        try:
            answers[number] = await store._read(fn)
        except StoreError as error:
            answers[number] = error

    async with trio.open_nursery() as nursery:
        for number in range(READ_GROUP * 8):
            nursery.start_soon(one, number)
    for number, answer in answers.items():
        if number % 7 == 0:
            assert isinstance(answer, StoreError)
        else:
            assert answer == number
    assert len(answers) == READ_GROUP * 8


async def test_reads_queued_when_the_store_closes_are_all_answered(tmp_path: Path) -> None:
    outcomes: list[Any] = []
    async with open_sqlite_store(tmp_path / "gw.sqlite3") as store:
        await store.create_run(grant("r"), token("r"))

        async def reader() -> None:
            try:
                outcomes.append(await store.get_run("r"))
            except StoreError as error:
                outcomes.append(error)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(READ_GROUP * 4):
                    nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()  # every read is queued or running
                await store.aclose()
    # Queued reads are still run by the closing store: none waits forever, none is lost.
    assert outcomes == [grant("r")] * (READ_GROUP * 4)


# --- lifecycle ------------------------------------------------------------------------------------


async def test_data_survives_reopen_and_closed_store_refuses(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite3"
    async with open_sqlite_store(path, synchronous="normal") as first:
        await attached(first, "r")
        await first.append_outputs("r", 1, events(0, 3))
        await first.kv_set("r", 1, {"k": "v"})
        await first.post_inputs("r", inputs(2))
    with pytest.raises(StoreError):
        await first.append_outputs("r", 1, events(3, 1))
    with pytest.raises(StoreError):
        await first.get_run("r")
    async with open_sqlite_store(path) as second:
        assert await second.get_run("r") == grant("r")
        assert await second.read_outputs("r", -1, 10) == events(0, 3)
        assert await second.kv_get("r", ["k"]) == {"k": "v"}
        assert await second.input_positions("r") == (-1, 1)
        session = await second.get_session("r")
        assert session is not None and session.epoch == 1


async def test_open_checks_settings_and_schema_version(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        async with open_sqlite_store(tmp_path / "a.sqlite3", synchronous="off"):
            pass
    path = tmp_path / "b.sqlite3"
    async with open_sqlite_store(path):
        pass
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(StoreError):
        async with open_sqlite_store(path):
            pass


async def test_a_version_1_file_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    """A file written before inputs were found by event id opens, indexed, with its rows."""
    path = tmp_path / "v1.sqlite3"
    async with open_sqlite_store(path) as store:
        await store.create_run(grant("r"), token("r"))
        await store.post_inputs("r", inputs(2))
    raw = sqlite3.connect(path)
    raw.execute("DROP INDEX inputs_by_event")  # what version 1 created
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()
    async with open_sqlite_store(path) as store:
        assert await store.post_inputs("r", inputs(3)) == [0, 1, 2]  # two known, one new
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    # The store's own lookup: without the index it scans the run's whole queue per event.
    plan = raw.execute("EXPLAIN QUERY PLAN " + SQL_INPUT_BY_EVENT, ("r", "in1")).fetchall()
    raw.close()
    assert "USING INDEX inputs_by_event (run_id=? AND event_id=?)" in str(plan)


# --- concurrency ----------------------------------------------------------------------------------


async def test_concurrent_appenders_and_readers(store: SQLiteStore) -> None:
    runs = [f"run{i}" for i in range(50)]
    batches, size = 10, 10
    for run in runs:
        await attached(store, run)
    outcomes: list[AppendOutcome] = []
    seen_by_readers: list[int] = []

    async def append(run: str) -> None:
        for batch in range(batches):
            answer = await store.append_outputs(run, 1, events(batch * size, size, tag=run))
            outcomes.append(answer.outcome)

    async def read(run: str) -> None:
        after = -1
        while after < batches * size - 1:
            got = await store.read_outputs(run, after, 7)
            assert [e.seq for e in got] == list(range(after + 1, after + 1 + len(got)))
            if got:
                after = got[-1].seq
            else:
                await trio.sleep(0.001)
        seen_by_readers.append(after)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for run in runs:
                nursery.start_soon(append, run)
            for run in runs[:10]:
                nursery.start_soon(read, run)
    assert outcomes == [AppendOutcome.STORED] * (len(runs) * batches)
    assert seen_by_readers == [batches * size - 1] * 10
    assert await store.count_outputs() == len(runs) * batches * size
    for run in runs:
        stored = await store.read_outputs(run, -1, 1000)
        assert [e.event_id for e in stored] == [f"{run}{s}" for s in range(batches * size)]


# --- durability -----------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    import trio
    from gateway.store.base import NewInput
    from gateway.store.sqlite import open_sqlite_store
    from statemachine.inputs import AppendOutcome
    from statemachine.messages import Capability, Millis, OutputEvent
    from statemachine.records import RunGrant, SessionRecord, SessionState

    async def writer(store, run):
        seq = 0
        i = 0
        while True:
            batch = [OutputEvent(f"{run}-{s}", s, "t", {"s": s, "pad": "p" * 150}, Millis(s))
                     for s in range(seq, seq + 10)]
            answer = await store.append_outputs(run, 1, batch)
            assert answer.outcome is AppendOutcome.STORED, answer
            seq += 10
            print(f"acked out {run} {seq - 1}", flush=True)
            await store.kv_set(run, 1, {f"k{i}": f"v{i}"})
            print(f"acked kv {run} {i}", flush=True)
            (given,) = await store.post_inputs(run, [NewInput(f"{run}-in{i}", "t", {}, Millis(i))])
            print(f"acked in {run} {i} {given}", flush=True)
            i += 1

    async def main(path):
        async with open_sqlite_store(path) as store:
            runs = ["a", "b", "c"]
            for run in runs:
                await store.create_run(
                    RunGrant(run, frozenset(), {}, {}, "v1"), run.encode().ljust(32, b"0"))
                record = SessionRecord(run, "s", SessionState.ATTACHED, 1, None, None,
                                       frozenset(), Millis(0))
                assert (await store.claim_epoch([record])).ok
            print("ready", flush=True)
            async with trio.open_nursery() as nursery:
                for run in runs:
                    nursery.start_soon(writer, store, run)

    trio.run(main, sys.argv[1])
    """
)


async def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "killed.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env, cwd=ROOT
    )
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(60):
        while buffer.count(b"\nacked") < 600:
            chunk = await process.stdout.receive_some(65536)
            assert chunk, "the writer died before it was killed"
            buffer += chunk
        process.kill()  # SIGKILL, mid-stream: the writer never stops on its own
        while chunk := await process.stdout.receive_some(65536):
            buffer += chunk  # lines printed before death are acknowledgements too
        await process.wait()
    await process.stdout.aclose()
    assert process.returncode == -9

    acked_out: dict[str, int] = {}
    acked_kv: dict[str, list[int]] = {}
    acked_in: dict[str, list[tuple[int, int]]] = {}
    for line in buffer.decode().splitlines():
        if not line.startswith("acked "):
            continue
        words = line.split()
        kind, run = words[1], words[2]
        if kind == "out":
            acked_out[run] = int(words[3])
        elif kind == "kv":
            acked_kv.setdefault(run, []).append(int(words[3]))
        else:
            acked_in.setdefault(run, []).append((int(words[3]), int(words[4])))
    assert set(acked_out) == {"a", "b", "c"}

    async with open_sqlite_store(path) as store:
        for run, last_acked in acked_out.items():
            stored = await store.read_outputs(run, -1, 1_000_000)
            # Contiguous from 0, each seq once, reaching at least every acknowledged seq.
            assert [e.seq for e in stored] == list(range(len(stored)))
            assert [e.event_id for e in stored] == [f"{run}-{e.seq}" for e in stored]
            assert len(stored) - 1 >= last_acked
            keys = [f"k{i}" for i in acked_kv.get(run, [])]
            assert await store.kv_get(run, keys) == {key: "v" + key[1:] for key in keys}
            queued = await store.read_inputs(run, -1, 1_000_000)
            assert [e.seq for e in queued] == list(range(len(queued)))
            ids = [e.event_id for e in queued]
            assert len(ids) == len(set(ids))
            for i, seq in acked_in.get(run, []):
                assert queued[seq].event_id == f"{run}-in{i}"
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    raw.close()
